"""Batch: the scheduler behind LLMClient.batch() and map(). Contract: docs/synth.md, "Batches"."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from typing import TYPE_CHECKING, Self

from megasynth.synth.llm.types import BudgetExceeded, LLMRequest

if TYPE_CHECKING:
    from megasynth.synth.llm.client import LLMClient


class Batch:
    def __init__(self, backend: LLMClient, on_result, *, max_pending: int, progress: str | bool):
        self.backend = backend
        self.on_result = on_result
        self._slots = asyncio.Semaphore(max_pending)
        self._tasks: set[asyncio.Task] = set()
        self._keys: set[str] = set()
        self._budget: BudgetExceeded | None = None
        self._error: BaseException | None = None
        self._bar, self._progress = None, progress
        self._last_postfix = 0.0
        self.submitted = 0

    async def __aenter__(self) -> Self:
        if self._progress:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc=self._progress if isinstance(self._progress, str) else "llm", unit="req",
                             file=sys.stderr, dynamic_ncols=True)
        return self

    async def submit(self, request: LLMRequest) -> None:
        """Queue a request (waits while max_pending are pending). Raises BudgetExceeded once the budget stopped
        the batch, ValueError for a key already submitted, the on_result error once one happened."""
        if self._error is not None:
            raise self._error
        if self._budget is not None:
            raise self._budget
        if request.key in self._keys:
            raise ValueError(f"LLM request key {request.key!r} submitted twice in one batch")
        self._keys.add(request.key)
        await self._slots.acquire()
        if self._budget is not None or self._error is not None:
            self._slots.release()
            raise self._budget or self._error
        self.submitted += 1
        if self._bar is not None:
            self._bar.total = self.submitted  # shown at the next update
        task = asyncio.get_running_loop().create_task(self._one(request))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _one(self, request: LLMRequest) -> None:
        try:
            result = await self.backend.run(request)
        except BudgetExceeded as e:
            self._budget = self._budget or e
            return
        finally:
            self._slots.release()
        self._tick()
        if self.on_result is not None:
            try:
                out = self.on_result(request, result)
                if inspect.isawaitable(out):
                    await out
            except BudgetExceeded as e:  # a follow-up submit refused: the batch is stopping anyway
                self._budget = self._budget or e

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if self._error is None:
            self._error = task.exception()
            for other in self._tasks:
                other.cancel()

    def _tick(self) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        if now - self._last_postfix > 0.5:
            self._last_postfix = now
            self._bar.set_postfix_str(self.backend.progress_text(), refresh=False)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and not issubclass(exc_type, BudgetExceeded):
                for task in self._tasks:  # the driver failed: stop now
                    task.cancel()
            while self._tasks:  # on_result may add tasks while we wait
                await asyncio.wait(set(self._tasks))
        finally:
            if self._bar is not None:
                self._bar.set_postfix_str(self.backend.progress_text(), refresh=False)
                self._bar.close()
        if exc_type is not None:
            return False
        if self._error is not None:
            raise self._error
        if self._budget is not None:
            raise self._budget
        return False
