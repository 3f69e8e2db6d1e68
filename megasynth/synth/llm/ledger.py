"""The LLM ledger: one JSONL line per finished request, and the running totals (requests, tokens, cost).

    ledger = Ledger("W/ledger.jsonl", price_in_per_m=2.5, price_out_per_m=10.0)
    await ledger.record_durable({"key": "doc1/entities", "model": "m", "outcome": "ok", "attempts": 1,
                                 "prompt_tokens": 812, "completion_tokens": 95, "latency_s": 1.2, "error": None})
    ledger.summary()        # {"requests": 1, "ok": 1, "failed": {}, "prompt_tokens": 812, ..., "cost_usd": ...}
    ledger.progress_text()  # "1 requests (1 ok, 0 failed), 812 in / 95 out tokens, $0.0030"
    ledger.close()          # writes what is queued, fsyncs, stops the writer thread

Durability, resumption and each line's fields: docs/synth.md, "The ledger"."""

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

from megasynth.synth.workdir import RecordLog

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
        self._log = None if path is None else RecordLog(path)
        self.price_in_per_m, self.price_out_per_m = price_in_per_m, price_out_per_m
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
            for _, entry in self._log.load():
                self._count(entry)
                self.previous += 1
            if self._log.torn:
                print(f"{self.path}: cut off a torn last line ({self._log.torn} bytes) left by an interrupted run",
                      file=sys.stderr)
            self._thread = threading.Thread(target=self._writer, name="llm-ledger", daemon=True)
            self._thread.start()

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_in_per_m + completion_tokens * self.price_out_per_m) / 1e6

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

    async def record_durable(self, entry: dict) -> dict:
        """Count one finished request (filling in cost_usd and time) and wait, without blocking the event loop,
        until its line is on disk. Raises LedgerError when that write or an earlier one failed: the caller must not
        treat the request as finished."""
        if self._error is not None:
            raise self._failure() from self._error
        entry = dict(entry)
        entry.setdefault("cost_usd", self.cost(entry.get("prompt_tokens", 0), entry.get("completion_tokens", 0)))
        entry.setdefault("time", round(time.time(), 3))
        self._count(entry)
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
                else:
                    lines.append(item[0])
                    waiters.append(item[1])
                if len(lines) >= _BATCH_LINES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines and self._error is None:
                try:
                    self._log.write("".join(lines).encode("utf-8"))
                except OSError as e:
                    self._error = e
            for w in waiters:
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

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        self._log.close()
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
