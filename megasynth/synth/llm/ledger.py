"""The LLM ledger: one JSONL line per finished request, and the running totals (requests, tokens, cost).

    ledger = Ledger("W/ledger.jsonl", price_in_per_m=2.5, price_out_per_m=10.0)
    await ledger.record_durable({"key": "doc1/entities", "model": "m", "outcome": "ok", "attempts": 1,
                                 "prompt_tokens": 812, "completion_tokens": 95, "latency_s": 1.2, "error": None})
    ledger.summary()        # {"requests": 1, "ok": 1, "failed": {}, "prompt_tokens": 812, ..., "cost_usd": ...}
    ledger.progress_text()  # "1 requests (1 ok, 0 failed), 812 in / 95 out tokens, $0.0030"
    ledger.close()          # writes what is queued, fsyncs, stops the writer thread

Lines are written by a background thread that flushes and fsyncs after each small batch (whatever queued while
the previous batch was on disk), so the event loop never blocks on the disk. `record_durable` returns only once
its line is written, flushed and fsynced (the client awaits it before handing a result to the caller, so a
result recorded as finished always has its ledger line: issue 19, budgets must not under-count after a
disk-full resume); a failed write raises LedgerError there, and for every later line, so the run stops instead
of going on unledgered. `record` (no waiting) is for callers without an event loop. A ledger that exists is
appended to and its lines count in the totals (a resumed run's budget covers what the killed run spent); a torn
last line from a crash or a failed write is cut off first (with a note on stderr). Each line: key, model, outcome ("ok", "failed", "budget": stopped by the budget before finishing),
attempts (HTTP requests made), repairs, prompt_tokens, completion_tokens, cost_usd, latency_s, error (the
reason, e.g. "timeout", "http_429", "invalid_json"), detail (the message, scrubbed of the API key), time (unix);
and, only when true: usage_estimated (the endpoint's usage was missing or invalid, so the tokens are estimates),
cut_to_max_tokens (a reply was longer than max_tokens and was cut), api_key_scrubbed (a reply held the API key,
replaced by a marker). The summary counts each of these.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from megasynth.io import read_jsonl, truncate_torn_tail

_BATCH_LINES = 256
_FLAGS = ("usage_estimated", "cut_to_max_tokens", "api_key_scrubbed")  # per-line flags counted in the summary


class LedgerError(OSError):
    """Writing the ledger failed (disk full, file too large, I/O error): the run must stop, since the budget and a
    resumed run count from the ledger."""


def _count_value(value) -> int:
    """A token or attempt count from a ledger line; anything but a non-negative int (a line written before usage
    was checked, a hand-edited file) counts as 0 rather than crash the totals or lower them."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Ledger:
    """Totals in memory, lines appended to `path` (None: totals only)."""

    def __init__(self, path: str | os.PathLike | None = None, *, price_in_per_m: float = 0.0,
                 price_out_per_m: float = 0.0):
        self.path = None if path is None else Path(path)
        self.price_in_per_m = price_in_per_m
        self.price_out_per_m = price_out_per_m
        self.requests = self.ok = self.http_requests = self.repairs = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0
        self.failed: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()  # lines with each of _FLAGS
        self.previous = 0  # lines found in an existing ledger
        self.started = time.monotonic()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load_existing()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # closed by close()
            self._thread = threading.Thread(target=self._writer, name="llm-ledger", daemon=True)
            self._thread.start()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_in_per_m + completion_tokens * self.price_out_per_m) / 1e6

    # -- reading an existing ledger ------------------------------------------------------------------------------
    def _load_existing(self) -> None:
        if not self.path.exists():
            return
        torn = truncate_torn_tail(self.path)
        if torn:
            print(f"{self.path}: cut off a torn last line ({torn} bytes) left by an interrupted run", file=sys.stderr)
        for _, entry in read_jsonl(self.path):
            self._count(entry)
            self.previous += 1

    # -- recording -----------------------------------------------------------------------------------------------
    def _count(self, entry: dict) -> None:
        self.requests += 1
        self.http_requests += _count_value(entry.get("attempts", 0))
        self.repairs += _count_value(entry.get("repairs", 0))
        self.prompt_tokens += _count_value(entry.get("prompt_tokens", 0))
        self.completion_tokens += _count_value(entry.get("completion_tokens", 0))
        cost = entry.get("cost_usd", 0.0)
        self.cost_usd += float(cost) if isinstance(cost, int | float) and cost >= 0 else 0.0
        for flag in _FLAGS:
            self.flags[flag] += bool(entry.get(flag))
        if entry.get("outcome") == "ok":
            self.ok += 1
        else:
            self.failed[entry.get("error") or entry.get("outcome") or "unknown"] += 1

    def _failure(self) -> LedgerError:
        e = self._error
        code = getattr(e, "errno", None) or errno.EIO
        return LedgerError(code, f"writing the LLM ledger failed ({getattr(e, 'strerror', None) or e}); the run "
                           "stopped, and the request whose line was lost is not recorded as finished: free space and "
                           "rerun the same command to continue", os.fspath(self.path))

    def _entry(self, entry: dict) -> dict:
        if self._error is not None:
            raise self._failure() from self._error
        entry = dict(entry)
        entry.setdefault("cost_usd", self.cost(entry.get("prompt_tokens", 0), entry.get("completion_tokens", 0)))
        entry.setdefault("time", round(time.time(), 3))
        self._count(entry)
        return entry

    def record(self, entry: dict) -> dict:
        """Count one finished request and queue its line (not waiting for the disk); fills in cost_usd and time.
        Raises LedgerError if an earlier write failed."""
        entry = self._entry(entry)
        if self._thread is not None:
            self._queue.put((json.dumps(entry, ensure_ascii=False) + "\n", None))
        return entry

    async def record_durable(self, entry: dict) -> dict:
        """record(), then wait (without blocking the event loop) until the line is written, flushed and fsynced.
        Raises LedgerError when the write fails: the caller must not treat the request as finished."""
        entry = self._entry(entry)
        if self._thread is not None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self._queue.put((json.dumps(entry, ensure_ascii=False) + "\n", (loop, done)))
            await done
        return entry

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            lines, waiters, stop = [], [], False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    lines.append(item[0])
                    if item[1] is not None:
                        waiters.append(item[1])
                if len(lines) >= _BATCH_LINES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines and self._error is None:
                try:
                    # os.write, not a buffered file: after a failed write nothing stays buffered to land later,
                    # glued after the torn line that the next run cuts off.
                    data = memoryview("".join(lines).encode("utf-8"))
                    while data:
                        data = data[os.write(self._fd, data):]
                    os.fsync(self._fd)
                except OSError as e:
                    self._error = e
            for w in waiters:
                if isinstance(w, threading.Event):
                    w.set()
                else:
                    self._resolve(*w)
            if stop:
                return

    def _resolve(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        error = None if self._error is None else self._failure()

        def settle():
            if not done.done():  # the waiting task may have been cancelled
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def flush(self, timeout: float = 60.0) -> None:
        """Block until every line recorded so far is on disk."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)
        if self._error is not None:
            raise self._failure() from self._error

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        os.close(self._fd)
        if self._error is not None:
            raise self._failure() from self._error

    # -- reporting -----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Totals over the whole ledger (earlier runs included): requests, ok, failed by reason, HTTP requests,
        repair requests, tokens in/out, estimated cost."""
        return {"requests": self.requests, "ok": self.ok, "failed": dict(sorted(self.failed.items())),
                "http_requests": self.http_requests, "repairs": self.repairs, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost_usd, 6),
                "previous_requests": self.previous, **{flag: self.flags[flag] for flag in _FLAGS}}

    def progress_text(self) -> str:
        """One line: requests, ok/failed (by reason), tokens, cost, and this run's request rate."""
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{k} {v}" for k, v in self.failed.most_common(3))
        rate = (self.requests - self.previous) / max(1e-9, time.monotonic() - self.started)
        return (f"{self.requests} requests ({self.ok} ok, {failed} failed{': ' + reasons if reasons else ''}), "
                f"{_k(self.prompt_tokens)} in / {_k(self.completion_tokens)} out tokens, ${self.cost_usd:.4f}, "
                f"{rate:.1f} req/s" + (f"; {anomalies}" if (anomalies := anomalies_text(self.summary())) else ""))


def anomalies_text(summary: dict) -> str:
    """What a hostile or broken endpoint made the client correct, from a ledger summary (items, counted once each):
    "" when nothing, else e.g. "2 replies cut to max_tokens, 1 reply with the API key removed"."""
    what = {"cut_to_max_tokens": "cut to max_tokens", "api_key_scrubbed": "with the API key removed",
            "usage_estimated": "with usage estimated (missing or invalid)"}
    return ", ".join(f"{n:,} {'reply' if n == 1 else 'replies'} {text}" for flag, text in what.items()
                     if (n := summary.get(flag, 0)))


def _k(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
