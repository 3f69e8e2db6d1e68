"""Rate limits and retry timing for the LLM client: token buckets, Retry-After, backoff with full jitter.

    bucket = TokenBucket(per_minute=600)        # requests/min (or tokens/min with n = estimated tokens)
    await bucket.acquire(1)                     # waits until the bucket allows it
    bucket.adjust(+120)                         # give back what an estimate overcounted (or charge more)
    parse_retry_after("2")  -> 2.0;  parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") -> seconds from now
    backoff_delay(attempt=3, base=1.0, cap=60.0, rng=random.Random())   # uniform in [0, min(cap, 1 * 2**2)]
    is_transient("http_503") -> True; is_transient("invalid_json") -> False   # a failure worth asking again
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from datetime import UTC

# A bucket holds this many seconds of its rate: enough to absorb jitter, not a whole minute at once (providers
# quantise per-minute limits into short windows, so a minute's burst at start-up earns 429s).
BURST_SECONDS = 2.0
MAX_RETRY_AFTER_S = 600.0  # a larger Retry-After is clamped (a misconfigured server must not park the run for hours)


class TokenBucket:
    """A token bucket refilled at per_minute / 60 per second, holding at most BURST_SECONDS of refill.

    A request larger than the capacity is let through once the bucket is full and leaves it in debt, so large
    requests are slowed, never refused. Waiters are served in arrival order (one lock)."""

    def __init__(self, per_minute: float):
        if per_minute <= 0:
            raise ValueError(f"a rate limit must be > 0 per minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * BURST_SECONDS)
        self.level = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, n: float) -> None:
        async with self._lock:
            need = min(float(n), self.capacity)
            self._refill()
            while self.level < need:
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill()
            self.level -= n

    def adjust(self, n: float) -> None:
        """Add n (give back an overestimate) or remove -n (charge an underestimate) after the fact."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), clamped to [0,
    MAX_RETRY_AFTER_S]; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):  # Python >= 3.10 raises for an unparsable date
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def retry_after_from_headers(headers) -> float | None:
    """Retry-After from a response's headers; OpenAI also sends retry-after-ms, which is more precise."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return min(max(float(ms) / 1000.0, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def is_transient(reason: str | None) -> bool:
    """Whether a failure reason says the endpoint, not the request, was at fault (429, 408, 5xx, timeout,
    connection); every other reason is a content failure (docs/synth.md, "Retry policy")."""
    if reason in ("timeout", "connection", "http_408", "http_429"):
        return True
    return bool(reason) and len(reason) == 8 and reason.startswith("http_5") and reason[5:].isdigit()


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter (AWS architecture blog, 2015): uniform in [0, min(cap, base *
    2**(attempt-1))], so clients that failed together do not retry together."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** max(0, attempt - 1)))
