"""The LLM interface served by our own checkpoint through megasynth.generate: no server, for small runs and tests.

    async with LocalBackend("runs/tiny", settings=LLMSettings(model="tiny", max_tokens=64), batch_size=8) as llm:
        r = await llm.complete("seed1", "Once upon a time")           # same LLMResult as LLMClient's
        r = await llm.chat("doc1/entities", [{"role": "user", "content": "..."}], schema=ENTITIES)
        await llm.map([...])                                         # batches, ledger, budget: all as LLMClient

Requests that arrive together are sampled in one batch (up to `batch_size`, grouped by sampling settings) by
megasynth.generate.generate in a worker thread, so the event loop keeps accepting requests meanwhile. Chat
messages are rendered with the tokenizer's chat template (megasynth/chat.py: its own, else the built-in ChatML,
whose tokens the tokenizer must have) and generation stops at the template's end-of-turn token; completions
start with the tokenizer's start token (BOS, else EOD) and stop at EOD. Every item samples from its own stream,
seeded by (seed, key, attempt), so a key's reply does not depend on what shared its batch, and a retry or repair
is a fresh draw. A prompt that does not fit the model's context with max_tokens fails with reason
"prompt_too_long" (never truncated). A small model's JSON is rarely valid; that is what repairs and failures are
for, not something this backend fixes. Supported sampling keys: temperature, max_tokens, top_p, top_k.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import zlib

from megasynth.synth.llm.backend import LLMBackend
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.llm.types import Usage, _Failure

_SAMPLING_KEYS = {"temperature", "max_tokens", "top_p", "top_k"}
DEFAULT_MAX_TOKENS = 256


class LocalBackend(LLMBackend):
    """LLMBackend whose transport is a local checkpoint (see the module docstring)."""

    def __init__(self, checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 settings: LLMSettings | None = None, ledger_path: str | os.PathLike | None = None,
                 device: str = "cpu", batch_size: int = 16, seed: int = 0):
        from megasynth.generate import load_model_and_tokenizer

        settings = settings or LLMSettings()
        # A local model has no rate limits; concurrency bounds how many requests can wait for a batch, so it must
        # be able to fill one.
        settings = dataclasses.replace(settings, model=settings.model or os.fspath(checkpoint),
                                       concurrency=max(settings.concurrency, batch_size))
        super().__init__(settings, ledger_path, seed=seed)
        self.model, self.cfg, self.tokenizer, _ = load_model_and_tokenizer(checkpoint, tokenizer, device)
        self.batch_size = batch_size
        self.seed = seed
        self._template = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    @property
    def template(self):
        """The chat template (loaded on first use; ChatTemplateError when the tokenizer cannot support one)."""
        if self._template is None:
            from megasynth.chat import load_chat_template

            self._template = load_chat_template(self.tokenizer)
        return self._template

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        await super().aclose()

    def _encode(self, kind: str, payload) -> tuple[list[int], int]:
        from megasynth.generate import default_start_ids

        tok = self.tokenizer
        if kind == "chat":
            template = self.template
            ids = tok.encode(template.prompt(payload))
            stop = template.end_of_turn_id if template.end_of_turn_id is not None else tok.eod_id
            return ids, stop
        return default_start_ids(tok) + tok.encode(payload, parse_special=False), tok.eod_id  # a prompt of text

    async def _send(self, kind, payload, sampling, key, attempt):
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise ValueError(f"LocalBackend: unsupported sampling settings {sorted(unknown)} "
                             f"(supported: {sorted(_SAMPLING_KEYS)})")
        ids, stop = self._encode(kind, payload)
        max_new = int(sampling.get("max_tokens") or DEFAULT_MAX_TOKENS)
        if len(ids) + max_new > self.cfg.model.max_seq_len:
            raise _Failure("prompt_too_long", f"the prompt has {len(ids)} tokens; with max_tokens={max_new} that "
                           f"exceeds the model's max_seq_len {self.cfg.model.max_seq_len}", retryable=False)
        params = (float(sampling.get("temperature", 1.0)), float(sampling.get("top_p", 1.0)),
                  int(sampling.get("top_k", 0)), max_new, stop)
        row_id = zlib.crc32(f"{key}\0{attempt}".encode()) & 0x7FFFFFFF
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._batches())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((params, ids, row_id, future))
        out = await future
        finished = bool(out) and out[-1] in (stop, self.tokenizer.eod_id)  # generate includes the stop token
        text = self.tokenizer.decode(out[:-1] if finished else out)
        if not text:
            raise _Failure("empty_reply", "the model stopped at once", retryable=True)
        return text, Usage(len(ids), len(out)), "stop" if finished else "length"

    async def _batches(self) -> None:
        """Take what is queued (up to batch_size per sampling setting), sample it in a thread, answer."""
        from megasynth.generate import generate

        while True:
            first = await self._queue.get()
            await asyncio.sleep(0)  # let requests submitted in the same tick join the batch
            items = [first]
            while not self._queue.empty() and len(items) < 4 * self.batch_size:
                items.append(self._queue.get_nowait())
            groups: dict[tuple, list] = {}
            for item in items:
                groups.setdefault(item[0], []).append(item)
            for (temperature, top_p, top_k, max_new, stop), group in groups.items():
                for start in range(0, len(group), self.batch_size):
                    chunk = [g for g in group[start:start + self.batch_size] if not g[3].cancelled()]
                    if not chunk:
                        continue
                    try:
                        outs = await asyncio.to_thread(
                            generate, self.model, [g[1] for g in chunk], max_new_tokens=max_new,
                            temperature=temperature, top_k=top_k, top_p=top_p, eod_id=self.tokenizer.eod_id,
                            seed=self.seed, stop_ids=(stop,), row_ids=[g[2] for g in chunk])
                    except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                        for g in chunk:
                            if not g[3].done():
                                g[3].set_exception(_Failure("local_error", f"{type(e).__name__}: {e}",
                                                            retryable=False))
                        continue
                    for g, out in zip(chunk, outs, strict=True):
                        if not g[3].done():
                            g[3].set_result(out)
