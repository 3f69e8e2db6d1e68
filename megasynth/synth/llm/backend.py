"""LLMBackend: everything of the LLM client but the transport (limits, retries, JSON checks and repairs, API-key
scrubbing, cutting replies to max_tokens, the ledger, the budget, batches). LLMClient (megasynth.synth.llm) sends
over HTTP, LocalBackend (megasynth.synth.llm.local_backend) samples a checkpoint. The policy it implements is in
megasynth.synth.llm's docstring.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable

from megasynth.synth.llm.ledger import Ledger
from megasynth.synth.llm.batch import Batch
from megasynth.synth.llm.json_replies import Validator, check_reply
from megasynth.synth.llm.limits import TokenBucket, backoff_delay
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.llm.types import BudgetExceeded, LLMRequest, LLMResult, Usage, _estimate_tokens, _Failure

DETAIL_CHARS = 300  # error details in results and the ledger are cut to this length


def repair_message(error: str) -> str:
    return (f"Your reply could not be used: {error}. Reply again with only the corrected JSON, "
            "no explanations and no code fences.")


class LLMBackend:
    """Everything but the transport: limits, retries, JSON checks, ledger, budget, batches. Subclasses
    implement `_send`; LLMClient talks HTTP, megasynth.synth.llm.local_backend.LocalBackend runs a checkpoint."""

    def __init__(self, settings: LLMSettings, ledger_path: str | os.PathLike | None = None, *,
                 secrets: Iterable[str] = (), seed: int | None = None, tokenizer=None):
        self.settings = settings
        # The output tokenizer (megasynth.tokenizer.Tokenizer), if any: replies are counted against max_tokens in it.
        self.reply_tokenizer = tokenizer
        self._secrets = [s for s in secrets if s]
        self.ledger = Ledger(ledger_path, price_in_per_m=settings.price_in_per_m,
                             price_out_per_m=settings.price_out_per_m)
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self._tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._rng = random.Random(seed)
        self._pause_until = 0.0  # monotonic time before which no request starts (a 429's Retry-After)
        self.in_flight = 0

    # -- the transport (subclasses) ------------------------------------------------------------------------------
    async def _send(self, kind: str, payload: list[dict] | str, sampling: dict, key: str,
                    attempt: int) -> tuple[str, Usage, str | None]:
        """One request: (text, usage, finish_reason), or raise _Failure."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.ledger.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- public interface ----------------------------------------------------------------------------------------
    async def chat(self, key: str, messages: list[dict], *, schema: dict | None = None,
                   validate: Validator | None = None, **sampling) -> LLMResult:
        """A chat completion for `messages`; see the module docstring for the retry, JSON and budget policy."""
        return await self._item("chat", key, list(messages), schema, validate, sampling)

    async def complete(self, key: str, prompt: str, *, schema: dict | None = None, validate: Validator | None = None,
                       **sampling) -> LLMResult:
        """A text completion of `prompt` (base models behind /v1/completions)."""
        return await self._item("complete", key, prompt, schema, validate, sampling)

    async def run(self, request: LLMRequest) -> LLMResult:
        if request.messages is not None:
            return await self.chat(request.key, request.messages, schema=request.schema, validate=request.validate,
                                   **request.sampling)
        return await self.complete(request.key, request.prompt, schema=request.schema, validate=request.validate,
                                   **request.sampling)

    def batch(self, on_result: Callable[[LLMRequest, LLMResult], Awaitable[None] | None] | None = None, *,
              max_pending: int | None = None, progress: str | bool = False) -> Batch:
        """A context manager running submitted requests concurrently (module docstring). `progress`: a tqdm bar
        on stderr, labelled with the string."""
        return Batch(self, on_result, max_pending=max_pending or 4 * self.settings.concurrency, progress=progress)

    async def map(self, requests: Iterable[LLMRequest], on_result=None, *, progress: str | bool = False
                  ) -> dict[str, LLMResult]:
        """Run every request; returns {key: result}. Raises BudgetExceeded (after in-flight ones finish) when the
        budget stops it: the results so far are in the ledger and were handed to on_result."""
        results: dict[str, LLMResult] = {}

        async def collect(request, result):
            results[request.key] = result
            if on_result is not None:
                out = on_result(request, result)
                if inspect.isawaitable(out):
                    await out

        async with self.batch(collect, progress=progress) as b:
            for request in requests:
                await b.submit(request)
        return results

    def summary(self) -> dict:
        return self.ledger.summary()

    def progress_text(self) -> str:
        return self.ledger.progress_text()

    @property
    def budget_reached(self) -> bool:
        s = self.settings
        return ((s.budget_tokens is not None and self.ledger.prompt_tokens + self.ledger.completion_tokens
                 >= s.budget_tokens) or (s.budget_usd is not None and self.ledger.cost_usd >= s.budget_usd))

    # -- one item ------------------------------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """`text` without the API key (nor its first or last 8 characters, which some servers echo)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
            if len(secret) >= 16:
                text = text.replace(secret[:8], "***").replace(secret[-8:], "***")
        return text

    def _defaults(self, sampling: dict) -> dict:
        out = dict(sampling)
        if self.settings.temperature is not None:
            out.setdefault("temperature", self.settings.temperature)
        if self.settings.max_tokens is not None:
            out.setdefault("max_tokens", self.settings.max_tokens)
        return out

    async def _item(self, kind: str, key: str, payload, schema, validate, sampling) -> LLMResult:
        started = time.monotonic()
        sampling = self._defaults(sampling)
        result = LLMResult(key=key, ok=False)
        wants_json = schema is not None or validate is not None
        max_attempts = self.settings.max_attempts
        first_transient: float | None = None  # when the item's first transient failure came back
        while True:
            if result.attempts - result.transient_failures >= max_attempts:
                break  # result.error / detail hold the last failure
            try:
                text, usage, finish = await self._attempt(kind, payload, sampling, key, result)
            except BudgetExceeded:
                if result.attempts:
                    result.error, result.detail = "budget", "stopped by the budget before the item finished"
                    await self._ledger(result, started, outcome="budget")
                raise
            except _Failure as f:
                result.error, result.detail = f.reason, self.scrub(f.detail)[:DETAIL_CHARS]
                result.transient = f.transient
                if f.transient:
                    result.transient_failures += 1
                    now = time.monotonic()
                    first_transient = now if first_transient is None else first_transient
                    left = self.settings.transient_budget_s - (now - first_transient)
                    wait = f.retry_after if f.retry_after is not None else min(left, backoff_delay(
                        result.transient_failures, self.settings.backoff_base_s, self.settings.backoff_max_s,
                        self._rng))
                    if f.retry_after is not None and f.reason == "http_429":  # the key's limit: every request waits
                        self._pause_until = max(self._pause_until, now + wait)
                    if left <= 0 or wait > left:
                        break  # out of budget (or told to come back after it): transient, a rerun asks again
                elif not f.retryable or result.attempts - result.transient_failures >= max_attempts:
                    break
                else:
                    wait = backoff_delay(result.attempts - result.transient_failures, self.settings.backoff_base_s,
                                         self.settings.backoff_max_s, self._rng)
                await asyncio.sleep(wait)
                continue
            result.usage.prompt_tokens += usage.prompt_tokens
            result.usage.completion_tokens += usage.completion_tokens
            result.usage.estimated |= usage.estimated
            text, finish = self._clean_reply(text, finish, usage, sampling, result)
            result.text, result.finish_reason, result.transient = text, finish, False
            if not wants_json:
                result.ok, result.error, result.detail = True, None, ""
                break
            parsed, problem = check_reply(text, schema=schema, validate=validate)
            if problem is None:
                parsed = self._scrub_value(parsed, result)  # a key spelt with JSON escapes only shows up here
                result.ok, result.parsed, result.error, result.detail = True, parsed, None, ""
                break
            result.error, result.detail = "invalid_json", self.scrub(problem)[:DETAIL_CHARS]
            if result.repairs >= self.settings.json_repair_attempts:
                break
            result.repairs += 1
            if kind == "chat":
                payload = [*payload, {"role": "assistant", "content": text},
                           {"role": "user", "content": repair_message(problem)}]
        await self._ledger(result, started, outcome="ok" if result.ok else "failed")
        return result

    def _clean_reply(self, text: str, finish: str | None, usage: Usage, sampling: dict,
                     result: LLMResult) -> tuple[str, str | None]:
        """(text, finish_reason) as the caller may use them: the API key replaced, then cut to max_tokens (the key
        first, so a cut cannot leave part of it). Marks the result when either happened."""
        clean = self.scrub(text)
        if clean != text:
            result.api_key_scrubbed, text = True, clean
        limit = sampling.get("max_tokens")
        # A character is at most 4 UTF-8 bytes, a token at least one: a text of at most limit / 4 chars fits.
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 and len(text) * 4 > limit:
            cut = self._cut(text, limit, usage)
            if cut is not None:
                result.cut_to_max_tokens = True
                return cut, "length"
        return text, finish

    def _cut(self, text: str, limit: int, usage: Usage) -> str | None:
        """The first `limit` tokens of text, or None when it is not longer than that."""
        if self.reply_tokenizer is not None:
            ids = self.reply_tokenizer.encode(text, parse_special=False)  # a reply is text, never special tokens
            if len(ids) <= limit:
                return None
            head = self.reply_tokenizer.decode(ids[:limit])
            trimmed = head.rstrip("\ufffd")  # a character split between the kept and the dropped tokens
            return trimmed if text.startswith(trimmed) else head
        # No tokenizer: only the server's own count can say the reply is too long (a lying one goes unnoticed).
        if usage.estimated or usage.completion_tokens <= limit:
            return None
        return text[: len(text) * limit // usage.completion_tokens]

    def _scrub_value(self, value, result: LLMResult):
        """A parsed JSON value with the API key scrubbed from every string in it."""
        if isinstance(value, str):
            clean = self.scrub(value)
            if clean != value:
                result.api_key_scrubbed = True
            return clean
        if isinstance(value, list):
            return [self._scrub_value(v, result) for v in value]
        if isinstance(value, dict):
            return {self._scrub_value(k, result): self._scrub_value(v, result) for k, v in value.items()}
        return value

    async def _attempt(self, kind, payload, sampling, key, result: LLMResult) -> tuple[str, Usage, str | None]:
        """Wait for the limits, check the budget, send one request, correct the tokens-per-minute charge."""
        delay = self._pause_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        estimate = _estimate_tokens(payload, sampling.get("max_tokens")) if self._tpm else 0
        if self._rpm:
            await self._rpm.acquire(1)
        if self._tpm:
            await self._tpm.acquire(estimate)
        async with self._sem:
            # Checked with the slot held, right before sending: a request that waited for a slot sees what the
            # requests before it spent.
            if self.budget_reached:
                if self._tpm:
                    self._tpm.adjust(estimate)
                raise BudgetExceeded(f"budget reached: {self.progress_text()}")
            result.attempts += 1
            self.in_flight += 1
            try:
                text, usage, finish = await self._send(kind, payload, sampling, key, result.attempts)
            except _Failure:
                if self._tpm:
                    self._tpm.adjust(estimate)  # nothing was generated: give the charge back
                raise
            finally:
                self.in_flight -= 1
        if self._tpm:
            self._tpm.adjust(estimate - usage.total)
        return text, usage, finish

    async def _ledger(self, result: LLMResult, started: float, *, outcome: str) -> None:
        """The item's ledger line, on disk before the result goes anywhere (LedgerError when it cannot be)."""
        result.latency_s = time.monotonic() - started
        flags = {"usage_estimated": result.usage.estimated, "cut_to_max_tokens": result.cut_to_max_tokens,
                 "api_key_scrubbed": result.api_key_scrubbed}
        await self.ledger.record_durable({"key": result.key, "model": self.settings.model, "outcome": outcome,
                                          "attempts": result.attempts, "repairs": result.repairs,
                                          "prompt_tokens": result.usage.prompt_tokens,
                                          "completion_tokens": result.usage.completion_tokens,
                                          "latency_s": round(result.latency_s, 4), "error": result.error,
                                          "transient": result.transient,
                                          "detail": result.detail or None,
                                          **{k: True for k, v in flags.items() if v}})
