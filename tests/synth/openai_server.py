"""A local OpenAI-compatible server for tests: scripted replies, injected faults, every request recorded.

    from synth.openai_server import Fault, OpenAIServer        # tests/ is on sys.path (tests/conftest.py)

    with OpenAIServer(api_key="sk-test-123", reply=lambda body: '{"entities": ["a"]}') as server:
        server.base_url                      # "http://127.0.0.1:PORT/v1", for LLMSettings(base_url=...)
        server.inject(Fault.status(429, retry_after=0.2), Fault.status(500), Fault.slow(5), Fault.drop())
        ...                                  # the next four requests get these faults, in order, then replies
        server.chaos(0.3, seed=1)            # then about 30% of requests get a fault drawn from a seeded schedule
        server.requests                      # [Recorded(path, json, headers, time), ...] in arrival order
        server.max_in_flight                 # the most requests the server held at once (see delay_s)

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI response shapes with `usage`), GET
/v1/models. `reply(request_json)` answers each completion request with the reply text, a `Reply` (text and
explicit token counts) or a `Fault` (so a test can script faults per key); it may be replaced at any time
(`server.reply = ...`). Injected faults are consumed first, one per request, whatever the path. Usage counts
are ceil(chars / 4) of the prompt (all message contents) and of the reply, unless a Reply gives them.

`chaos(rate, seed, faults=CHAOS_FAULTS)` gives each later request (after the injected ones) a fault with
probability `rate`, drawn uniformly from `faults`, from one seeded stream in arrival order (the mix of an
unreliable endpoint: 429 with Retry-After, 500, 503, a dropped connection, a reply slower than the client's
timeout); `chaos(0)` ends it. `faults_served` counts the faults served, by kind.

Faults: `status(code, retry_after=None)` answers with that HTTP status and an OpenAI-style error body
(Retry-After header when given: seconds, or a string such as an HTTP date); `slow(seconds)` waits that long
before answering normally (longer than the client's timeout, so the client gives up); `drop()` closes the
connection without any response; `huge(nbytes, status=200, announce=False)` answers with a body of about nbytes
(a completion whose text is filler), streamed in 64 KiB chunks of one reused buffer, so the server never holds
it (Content-Length only with announce; it stops when the client hangs up).

Hostile replies (issue 19): `Reply(text, usage=...)` sends that usage object verbatim (strings, negatives,
bools: whatever the test wants the client to survive); `Reply(text, echo_authorization=True)` puts the
request's Authorization header before the text, as a server that echoes the API key in a successful reply.
Malformed JSON is just a scripted reply string.

With `api_key`, a request whose `Authorization` is not `Bearer <api_key>` gets 401 (recorded like the rest).
The server runs on its own event loop in a daemon thread, binds 127.0.0.1 on an ephemeral port only, and
stop() returns within a few seconds even with slow requests pending. A 401 echoes the key it was given, as
careless servers do, so tests can check that the client scrubs it. `delay_s` makes every completion request
wait before its answer, so concurrent requests overlap and `max_in_flight` measures the client's concurrency.

`python tests/synth/openai_server.py [--port P] [--reply TEXT]` serves until interrupted, answering every
request at once (the benchmark in bench/llm_client.py runs it as a separate process this way).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web

HOST = "127.0.0.1"
# A distinctive fake key: tests grep work dirs, logs and outputs for it (it must never appear).
TEST_API_KEY = "sk-megasynth-test-Q7vX2pL9kT4mN8rW"
TEST_API_KEY_ENV = "MEGASYNTH_TEST_LLM_KEY"


@dataclass(frozen=True)
class Fault:
    """What the server does instead of (or before) answering; build with the classmethods."""

    kind: str  # "status", "slow", "drop" or "huge"
    status_code: int = 0
    retry_after: float | str | None = None
    seconds: float = 0.0
    nbytes: int = 0
    announce: bool = False

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None) -> Fault:
        return cls("status", status_code=code, retry_after=retry_after)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls("slow", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def huge(cls, nbytes: int, status: int = 200, announce: bool = False) -> Fault:
        return cls("huge", status_code=status, nbytes=nbytes, announce=announce)


# What chaos() draws from by default: the transient failures of a busy or flaky endpoint (issue 19). The slow
# reply outlasts a client timeout of under a second (tests scale time down).
CHAOS_FAULTS = (Fault.status(429, retry_after=0.05), Fault.status(500), Fault.status(503), Fault.drop(),
                Fault.slow(1.5))


@dataclass(frozen=True)
class Reply:
    """A reply text with explicit token counts (None: estimated as ceil(chars / 4))."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage: object = None  # sent verbatim as "usage" instead of the counts (a hostile server's: {"prompt_tokens": "1"})
    echo_authorization: bool = False  # the request's Authorization header, then the text


@dataclass
class Recorded:
    """One request as the server received it."""

    path: str
    json: dict | None
    headers: dict = field(repr=False)
    time: float = 0.0


def default_reply(body: dict) -> str:
    return "ok"


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def prompt_text(body: dict) -> str:
    """All the prompt text of a request: the chat messages' contents, or the completion prompt."""
    if "messages" in body:
        return "".join(str(m.get("content") or "") for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else "".join(map(str, prompt))


class OpenAIServer:
    """See the module docstring. Use as a context manager, or call start() and stop()."""

    def __init__(self, *, reply: Callable[[dict], str | Reply | Fault] = default_reply, api_key: str | None = None,
                 delay_s: float = 0.0, port: int = 0, record: bool = True):
        self.reply = reply
        self.api_key = api_key
        self.delay_s = delay_s  # every completion request waits this long before its answer (concurrency tests)
        self.port = port
        self.record = record  # the benchmark turns recording off
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: deque[Fault] = deque()
        self._chaos: tuple[float, random.Random, tuple[Fault, ...]] | None = None
        self.faults_served: dict[str, int] = {}  # "status_429", "drop", "slow", ... -> count
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._counter = 0

    # -- test-side API -------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each of the next len(faults) requests gets one, in order."""
        with self._lock:
            self._faults.extend(faults)

    def chaos(self, rate: float, seed: int = 0, faults: tuple[Fault, ...] = CHAOS_FAULTS) -> None:
        """From now on (after the injected faults) each request gets a fault with probability `rate`, drawn from
        `faults` by a stream seeded with `seed`; rate 0 ends it."""
        with self._lock:
            self._chaos = (rate, random.Random(seed), tuple(faults)) if rate > 0 else None

    def completion_requests(self) -> list[Recorded]:
        """The recorded POSTs to /v1/chat/completions and /v1/completions."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("completions")]

    def reset(self) -> None:
        """Forget recorded requests, pending faults, the chaos schedule and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._chaos = None
            self.faults_served = {}
            self.max_in_flight = self.in_flight

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="openai-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("the test server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the test server failed to start: {self._error!r}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the test server did not stop within {timeout} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
            # Handlers still sleeping in a slow fault: cancel them so the loop closes cleanly.
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        except BaseException as e:  # noqa: BLE001 - reported to start() / kept for the test to see
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        # shutdown_timeout bounds how long stop() waits for handlers still running (slow faults).
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # -- handlers ------------------------------------------------------------------------------------------------
    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if self.record:
            with self._lock:
                self.requests.append(Recorded(request.path, None, dict(request.headers), time.monotonic()))
        if not self._authorised(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return web.json_response({"object": "list", "data": [{"id": "test-model", "object": "model",
                                                               "created": 0, "owned_by": "tests"}]})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        with self._lock:
            if self.record:
                self.requests.append(Recorded(request.path, body, dict(request.headers), time.monotonic()))
            fault = self._faults.popleft() if self._faults else None
            if fault is None and self._chaos is not None:
                rate, rng, choices = self._chaos
                draw, pick = rng.random(), rng.randrange(len(choices))  # two draws per request, fault or not
                fault = choices[pick] if draw < rate else None
            if fault is not None:
                name = fault.kind if fault.kind != "status" else f"status_{fault.status_code}"
                self.faults_served[name] = self.faults_served.get(name, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not self._authorised(request):
                # Echo the presented key, as careless servers do, so tests check that the client scrubs it.
                presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
                return _error(401, f"Incorrect API key provided: {presented}.", "invalid_api_key")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not isinstance(body, dict):
                return _error(400, "The request body is not a JSON object.", "invalid_request_error")
            answer = fault if fault is not None else self.reply(body)
            if isinstance(answer, Fault):
                if answer.kind == "status":
                    headers = {} if answer.retry_after is None else {"Retry-After": str(answer.retry_after)}
                    return _error(answer.status_code, f"injected status {answer.status_code}", "injected",
                                  headers)
                if answer.kind == "drop":
                    request.transport.abort()  # no status line, no body: the client sees a dropped connection
                    return web.Response()
                if answer.kind == "huge":
                    return await _huge(request, answer)
                await asyncio.sleep(answer.seconds)
                answer = self.reply(body)
                if isinstance(answer, Fault):
                    return _error(500, "a slow fault cannot be followed by another fault", "injected")
            if isinstance(answer, Reply) and answer.echo_authorization:
                answer = Reply(f"(you sent: {request.headers.get('Authorization', '')}) {answer.text}",
                               answer.prompt_tokens, answer.completion_tokens, answer.usage)
            return web.json_response(_response(request.path, body, answer))
        finally:
            with self._lock:
                self.in_flight -= 1


def _error(status: int, message: str, code: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": code, "param": None, "code": code}},
                             status=status, headers=headers)


async def _huge(request: web.Request, fault: Fault) -> web.StreamResponse:
    """A completion body of about fault.nbytes, the filler streamed from one 64 KiB buffer."""
    head = b'{"id": "cmpl-huge", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": ' \
           b'"assistant", "content": "'
    tail = b'"}, "finish_reason": "stop"}]}'
    chunk = b"x" * 65536
    n = max(0, fault.nbytes - len(head) - len(tail)) // len(chunk)
    response = web.StreamResponse(status=fault.status_code, headers={"Content-Type": "application/json"})
    if fault.announce:
        response.content_length = len(head) + n * len(chunk) + len(tail)
    await response.prepare(request)
    try:
        await response.write(head)
        for _ in range(n):
            await response.write(chunk)
        await response.write(tail)
        await response.write_eof()
    except (ConnectionError, RuntimeError):  # the client hung up (what a capped client does)
        pass
    return response


def _response(path: str, body: dict, answer: str | Reply) -> dict:
    reply = answer if isinstance(answer, Reply) else Reply(str(answer))
    prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else _tokens(prompt_text(body))
    completion_tokens = reply.completion_tokens if reply.completion_tokens is not None else _tokens(reply.text)
    usage = reply.usage if reply.usage is not None else {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}
    common = {"id": "cmpl-test", "created": int(time.time()), "model": body.get("model", "test-model"),
              "usage": usage}
    if path.endswith("chat/completions"):
        return {**common, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": "stop", "logprobs": None}]}
    return {**common, "object": "text_completion",
            "choices": [{"index": 0, "text": reply.text, "finish_reason": "stop", "logprobs": None}]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a local OpenAI-compatible endpoint that answers at once.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: an ephemeral one)")
    parser.add_argument("--reply", default="ok", help="the text every completion request gets")
    args = parser.parse_args()
    server = OpenAIServer(reply=lambda body: args.reply, port=args.port, record=False).start()
    print(server.base_url, flush=True)  # the parent process reads the address from this line
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
