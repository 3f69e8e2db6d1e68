"""The servers an LLMClient sends to: one API root, or a fleet of them (several `vllm serve` processes of the same
model, no load balancer). Each request takes a slot on the healthy server with the fewest in flight; a server
that fails transiently SERVER_FAILURES_IN_ROW times in a row is out of rotation for a cool-down, then probed.

    pool = ServerPool(urls, concurrency=16, cooldown_s=30.0, make_apis=lambda url: [...], scrub=client.scrub)
    server = await pool.acquire(avoid=last_failed)      # waits for a slot; prefers healthy, unpaused servers
    try: ... server.api() ... pool.succeeded(server) / pool.failed(server, attempt_failed)
    finally: pool.release(server)

The policy (what is retried where, what survives what): docs/synth.md, "Several servers"."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from megasynth.synth.llm.types import AttemptFailed

# Failures in a row that take a server out of rotation: one is noise (a dropped connection, a 503 while a
# vLLM engine is busy), two in a row with no success between them is a server that stopped answering.
SERVER_FAILURES_IN_ROW = 2


@dataclass(eq=False)
class Server:
    """One API root: its connection pools, its load and its health."""

    url: str
    apis: list  # openai.AsyncOpenAI clients, a few connections each (LLMClient.__init__ says why)
    busy: list[int] = field(default_factory=list)  # requests in flight on each of apis
    in_flight: int = 0
    failures_in_row: int = 0  # transient failures since its last reply
    out_until: float | None = None  # out of rotation until then (monotonic); None: in rotation
    probing: bool = False  # its one probe request after the cool-down is in flight
    paused_until: float = 0.0  # a 429's Retry-After: no request starts here before then (monotonic)
    structured: bool = True  # False once it rejected response_format (structured_output "auto")

    def __post_init__(self):
        self.busy = [0] * len(self.apis)

    def shard(self) -> int:
        """The index of the connection pool with the fewest requests in flight (the caller counts it busy)."""
        return self.busy.index(min(self.busy))


class ServerPool:
    """The servers of one client, `concurrency` requests in flight on each at most. Requests waiting for a slot are
    served in arrival order."""

    def __init__(self, urls: list[str], *, concurrency: int, cooldown_s: float, make_apis: Callable[[str], list],
                 scrub: Callable[[str], str] = str):
        self.servers = [Server(url, make_apis(url)) for url in urls]
        self.scrub = scrub  # what it prints of a server's error message passes through this (the API key out)
        self.concurrency = concurrency
        self.cooldown_s = cooldown_s
        self._waiters: deque[asyncio.Future] = deque()
        self._next = 0  # where the round robin among equally loaded servers starts

    @property
    def several(self) -> bool:
        return len(self.servers) > 1

    def apis(self):
        for server in self.servers:
            yield from server.apis

    # -- choosing ----------------------------------------------------------------------------------------------------
    def _choose(self, avoid: Server | None) -> Server | None:
        """The server the next request goes to, or None when every usable one is at `concurrency`."""
        if not self.several:
            server = self.servers[0]
            return server if server.in_flight < self.concurrency else None
        now = time.monotonic()
        # In rotation, or due for its probe (cool-down over, no probe in flight).
        usable = [s for s in self.servers if s.out_until is None or (now >= s.out_until and not s.probing)]
        if not usable:  # every server is out: all of them take requests again (the retry loop backs off)
            usable = self.servers
        if avoid is not None and len(usable) > 1:
            usable = [s for s in usable if s is not avoid]
        # A server paused by a 429 takes requests only when every usable one is (waiting for an unpaused server's
        # slot beats sleeping out the pause on a free one).
        usable = [s for s in usable if s.paused_until <= now] or usable
        best = None
        for i in range(len(self.servers)):
            s = self.servers[(self._next + i) % len(self.servers)]
            if s in usable and s.in_flight < self.concurrency and (best is None or s.in_flight < best.in_flight):
                best = s
        if best is not None:
            self._next = (self.servers.index(best) + 1) % len(self.servers)
        return best

    def other_available(self, server: Server) -> bool:
        """Whether another server is in rotation and not paused: a failed attempt is retried there at once."""
        now = time.monotonic()
        return any(s is not server and s.out_until is None and s.paused_until <= now for s in self.servers)

    async def acquire(self, avoid: Server | None = None) -> Server:
        """A slot on the chosen server (`avoid`: another one if any is usable), waiting while every usable server is
        at `concurrency`; then waits out that server's 429 pause, if any, with the slot held (its limit)."""
        server = None if self._waiters else self._choose(avoid)
        if server is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                while True:
                    await waiter
                    if (server := self._choose(avoid)) is not None:
                        break
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.appendleft(waiter)  # keeps its place in the queue
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was woken for a slot it will not take: pass the turn on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        server.in_flight += 1
        if server.out_until is not None:
            server.probing = True
        if self._waiters:
            self._wake()  # another slot may be free too: the next in line looks
        delay = server.paused_until - time.monotonic()
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.release(server)
                raise
        return server

    def release(self, server: Server) -> None:
        server.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- health --------------------------------------------------------------------------------------------------------
    def succeeded(self, server: Server) -> None:
        """The server answered (a reply, or an error that is not a transient failure): in rotation."""
        server.failures_in_row = 0
        server.probing = False
        if server.out_until is not None:
            server.out_until = None
            print(f"{server.url}: answering again, back in rotation", file=sys.stderr)
            self._wake()

    def failed(self, server: Server, failure: AttemptFailed) -> None:
        """A failed attempt: a 429's Retry-After pauses this server only; transient failures (timeouts, dropped
        connections, 5xx) in a row take it out of rotation for the cool-down; any other failure is the request's
        (the server answered)."""
        if failure.reason == "http_429" or not failure.transient:
            self.succeeded(server)
            if failure.retry_after is not None and failure.reason == "http_429":
                server.paused_until = max(server.paused_until, time.monotonic() + failure.retry_after)
            return
        server.failures_in_row += 1
        was_probe, server.probing = server.probing, False
        if not self.several or not (was_probe or server.failures_in_row >= SERVER_FAILURES_IN_ROW):
            return
        if server.out_until is None:
            last = self.scrub(failure.detail)[:200]
            print(f"{server.url}: {server.failures_in_row} failures in a row (last: {last}); out of rotation for "
                  f"{self.cooldown_s:g} s, its requests go to the other servers", file=sys.stderr)
        server.out_until = time.monotonic() + self.cooldown_s
