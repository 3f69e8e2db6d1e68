"""The LLM ledger: one JSONL line per finished request, and the running totals (requests, tokens, cost).

    ledger = Ledger("W/ledger.jsonl", price_in_per_m=2.5, price_out_per_m=10.0)
    ledger.record({"key": "doc1/entities", "model": "m", "outcome": "ok", "attempts": 1,
                   "prompt_tokens": 812, "completion_tokens": 95, "latency_s": 1.2, "error": None})
    ledger.summary()        # {"requests": 1, "ok": 1, "failed": {}, "prompt_tokens": 812, ..., "cost_usd": ...}
    ledger.progress_text()  # "1 requests (1 ok, 0 failed), 812 in / 95 out tokens, $0.0030"
    ledger.close()          # writes what is queued, fsyncs, stops the writer thread

Lines are written by a background thread that flushes and fsyncs after each small batch (whatever queued while
the previous batch was on disk), so the event loop never waits for the disk and a crash loses at most the
requests of the last batch. A ledger that exists is appended to and its lines count in the totals (a resumed
run's budget covers what the killed run spent); a torn last line from a crash is cut off first (with a note on
stderr). Each line: key, model, outcome ("ok", "failed", "budget": stopped by the budget before finishing),
attempts (HTTP requests made), repairs, prompt_tokens, completion_tokens, cost_usd, latency_s, error (the
reason, e.g. "timeout", "http_429", "invalid_json"), detail (the message, scrubbed of the API key), time (unix).
"""

from __future__ import annotations

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
        self.previous = 0  # lines found in an existing ledger
        self.started = time.monotonic()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load_existing()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
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
        self.http_requests += int(entry.get("attempts", 0))
        self.repairs += int(entry.get("repairs", 0))
        self.prompt_tokens += int(entry.get("prompt_tokens", 0))
        self.completion_tokens += int(entry.get("completion_tokens", 0))
        self.cost_usd += float(entry.get("cost_usd", 0.0))
        if entry.get("outcome") == "ok":
            self.ok += 1
        else:
            self.failed[entry.get("error") or entry.get("outcome") or "unknown"] += 1

    def record(self, entry: dict) -> dict:
        """Count one finished request and queue its line; fills in cost_usd and time. Raises the writer's
        error (disk full, ...) if an earlier write failed."""
        if self._error is not None:
            raise OSError(f"{self.path}: writing the ledger failed: {self._error}") from self._error
        entry = dict(entry)
        entry.setdefault("cost_usd", self.cost(entry.get("prompt_tokens", 0), entry.get("completion_tokens", 0)))
        entry.setdefault("time", round(time.time(), 3))
        self._count(entry)
        if self._thread is not None:
            self._queue.put(json.dumps(entry, ensure_ascii=False) + "\n")
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
                    lines.append(item)
                if len(lines) >= _BATCH_LINES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines and self._error is None:
                try:
                    self._file.write("".join(lines))
                    self._file.flush()
                    os.fsync(self._file.fileno())
                except OSError as e:
                    self._error = e
            for w in waiters:
                w.set()
            if stop:
                return

    def flush(self, timeout: float = 60.0) -> None:
        """Block until every line recorded so far is on disk."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)
        if self._error is not None:
            raise OSError(f"{self.path}: writing the ledger failed: {self._error}") from self._error

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None
        self._file.close()
        if self._error is not None:
            raise OSError(f"{self.path}: writing the ledger failed: {self._error}") from self._error

    # -- reporting -----------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Totals over the whole ledger (earlier runs included): requests, ok, failed by reason, HTTP requests,
        repair requests, tokens in/out, estimated cost."""
        return {"requests": self.requests, "ok": self.ok, "failed": dict(sorted(self.failed.items())),
                "http_requests": self.http_requests, "repairs": self.repairs, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost_usd, 6),
                "previous_requests": self.previous}

    def progress_text(self) -> str:
        """One line: requests, ok/failed (by reason), tokens, cost, and this run's request rate."""
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{k} {v}" for k, v in self.failed.most_common(3))
        rate = (self.requests - self.previous) / max(1e-9, time.monotonic() - self.started)
        return (f"{self.requests} requests ({self.ok} ok, {failed} failed{': ' + reasons if reasons else ''}), "
                f"{_k(self.prompt_tokens)} in / {_k(self.completion_tokens)} out tokens, ${self.cost_usd:.4f}, "
                f"{rate:.1f} req/s")


def _k(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
