"""Async client for any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, a local server): limits, retries,
JSON replies checked against a schema with bounded repairs, an append-only ledger, and a budget (issue 13).

    settings = LLMSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B", concurrency=32)
    async with LLMClient(settings, ledger_path="W/ledger.jsonl") as client:
        r = await client.chat("doc7/entities", [{"role": "user", "content": prompt}], schema=ENTITIES)
        r.ok, r.text, r.parsed, r.usage, r.attempts, r.error      # never raises for a failed request
        r = await client.complete("seed12", "Once upon a time", max_tokens=256)   # base models (/v1/completions)

Running many requests, submitting more as results arrive (EntiGraph submits a document's pair requests when
its entities come back):

    async def on_result(request: LLMRequest, result: LLMResult):
        if result.ok and request.meta["step"] == "entities":
            for pair in sample_pairs(result.parsed["entities"]):
                await batch.submit(LLMRequest(key=..., messages=..., meta={"step": "relation"}))
        append_record(request, result)                       # your own resumable output
    try:
        async with client.batch(on_result, progress="entigraph") as batch:
            for doc in docs:
                await batch.submit(LLMRequest(key=f"{doc.id}/entities", messages=..., schema=ENTITIES,
                                              meta={"step": "entities"}))
    except BudgetExceeded:
        ...                                                  # every started request finished and is ledgered

`submit` waits while `max_pending` requests are queued (bounded memory), refuses a key already submitted to the
batch (ValueError: a duplicate would duplicate output), and raises BudgetExceeded once the budget is reached.
`on_result(request, result)` (sync or async) runs for each finished request, failed ones included (result.ok
False, result.error the reason); it may submit more. Leaving the block waits for everything submitted; an
exception from on_result cancels the rest and propagates. `await client.map(requests)` is the simple form.

Policy (what tests/synth/test_llm.py checks):
- Transient failures are not data loss (issue 19): 429, 408, 5xx, timeouts (`timeout_s` per request) and dropped
  connections are retried for up to `transient_budget_s` seconds from the item's first one, and never count
  as attempts. The wait is the server's Retry-After (seconds or an HTTP date; a 429's Retry-After pauses every
  request of the client, since the limit is the key's) or else exponential backoff with full jitter; a
  Retry-After beyond what is left of the budget ends the item at once. An item that runs out of budget fails
  with result.transient True: asking again later may succeed (the pipelines' plain rerun does).
- Attempts: an item (one key) makes at most `max_attempts` requests that got a reply: the first, JSON repairs,
  and retries after unreadable or empty replies. Other 4xx fail at once. These content failures are permanent
  (result.transient False): the pipelines ask again only with --retry-failed.
- JSON (schema= or validate=): a reply that is not JSON or does not validate gets a repair request (the
  conversation + the bad reply + a message saying what was wrong; for complete(), a fresh sample), at most
  `json_repair_attempts` of them. A reply that is never valid ends as failed, reason "invalid_json", after
  min(max_attempts, 1 + json_repair_attempts) requests.
- Budget: before each HTTP request, if the tokens (prompt + completion) or the estimated cost already spent,
  earlier runs in the same ledger included, reach `budget_tokens` / `budget_usd`, the request is not sent and
  BudgetExceeded is raised (an item that had already spent tokens is ledgered with outcome "budget" first);
  requests already sent finish and are ledgered, so the overshoot is at most what was in flight.
- The API key is read from the environment variable `api_key_env` (unset: "EMPTY", what vLLM accepts) and is
  scrubbed from every error message, ledger line and exception text this module produces, and from every reply
  text (and parsed JSON value): a server that echoes the Authorization header must not put the key in the output.
  It becomes "***"; the item's ledger line says api_key_scrubbed and the summary counts them.
- Replies are not trusted (issue 19, a hostile endpoint). A reply body over `max_reply_bytes` is abandoned as it
  streams in (Content-Length checked first; compressed bodies refused, since identity is asked) and the item
  fails, reason "reply_too_large". A reply longer than the request's max_tokens is cut to it and marked
  finish_reason "length" (ledger: cut_to_max_tokens), counted in the tokenizer the caller passes (the output
  tokenizer: the cut protects the output, which is measured in its tokens), or without one, when the server's
  own completion_tokens exceed the limit, cut in proportion of characters. Usage that is not a non-negative int
  (a string, a bool, a float, a negative or absurd number) counts as missing: the tokens are estimated (chars /
  4) and the ledger line says usage_estimated, so a server cannot crash the run or defeat the budget with it.
- Ledger lines are durable before results: an item's result reaches the caller (on_result, map) only once its
  ledger line is fsynced; a failed ledger write raises LedgerError (an OSError naming the ledger), which stops the
  batch (megasynth.synth.ledger).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

from megasynth.synth.ledger import Ledger, LedgerError
from megasynth.synth.llm_json import Validator, check_reply
from megasynth.synth.llm_limits import (
    TokenBucket,
    backoff_delay,
    is_transient,
    retry_after_from_headers,
)
from megasynth.synth.llm_settings import (
    LLMSettings,
    add_llm_arguments,
    settings_from_args,
)

__all__ = ["BudgetExceeded", "LLMBackend", "LLMClient", "LLMRequest", "LLMResult", "LLMSettings", "LedgerError",
           "Usage", "add_llm_arguments", "settings_from_args"]

DETAIL_CHARS = 300  # error details in results and the ledger are cut to this length
CONNECTIONS_PER_POOL = 8  # LLMClient spreads its connections over pools of this size (see LLMClient.__init__)
_NO_KEY = "EMPTY"
MAX_USAGE_TOKENS = 100_000_000  # more tokens than one request has ever held: such a count is not a count
# Per request: read the body as a stream (openai returns the httpx response unread) so that _bound_body can stop
# it at max_reply_bytes, and ask for an uncompressed one, whose size on the wire is its size in memory.
_STREAMED_REPLY = {"X-Stainless-Raw-Response": "stream", "Accept-Encoding": "identity"}


class BudgetExceeded(RuntimeError):
    """The token or dollar budget is spent: no new request is started. Requests in flight finish normally."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # the endpoint gave no usable usage (missing or invalid): these are chars / 4

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class LLMResult:
    """What became of one item (one key): the reply, or why there is none."""

    key: str
    ok: bool
    text: str = ""  # the last reply's text ("" when there was none)
    parsed: Any = None  # the JSON value (when schema= or validate= was given and it validated)
    usage: Usage = field(default_factory=Usage)  # summed over every HTTP request of the item
    attempts: int = 0  # HTTP requests made (retries and repairs included)
    transient_failures: int = 0  # of which failed transiently (429, 408, 5xx, timeout, connection)
    transient: bool = False  # not ok because transient failures outlasted transient_budget_s (worth asking again)
    repairs: int = 0  # of which JSON repair requests
    latency_s: float = 0.0  # wall time of the whole item, waits included
    error: str | None = None  # the reason when not ok: timeout, connection, http_429, http_400, invalid_json, ...
    detail: str = ""  # the last error's message (API key scrubbed)
    finish_reason: str | None = None  # the endpoint's, for the last reply ("length": cut at max_tokens)
    cut_to_max_tokens: bool = False  # a reply was longer than max_tokens and was cut to it (finish "length")
    api_key_scrubbed: bool = False  # a reply held the API key, replaced by "***"


@dataclass
class LLMRequest:
    """One keyed request for batch()/map(): chat when `messages` is given, a text completion when `prompt` is."""

    key: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None  # text, or token ids (vLLM and others accept them)
    schema: dict | None = None
    validate: Validator | None = None
    sampling: dict = field(default_factory=dict)  # temperature=, max_tokens=, top_p=, stop=, seed=, ...
    meta: Any = None  # the caller's, handed back with the result

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"LLMRequest {self.key!r}: give exactly one of messages (chat) or prompt (completion)")


class _Failure(Exception):
    """One failed HTTP request: reason (short, for counting), detail, whether to retry, the server's wait."""

    def __init__(self, reason: str, detail: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after
        # The endpoint's fault, not the request's: retried within the time budget, not counted as an attempt.
        self.transient = retryable and is_transient(reason)


def _estimate_tokens(payload: list[dict] | list[int] | str, max_tokens: int | None) -> int:
    if isinstance(payload, list) and all(isinstance(t, int) for t in payload):  # a prompt given as token ids
        prompt = len(payload)
    else:
        chars = len(payload) if isinstance(payload, str) else sum(len(str(m.get("content") or "")) for m in payload)
        prompt = chars // 4
    return prompt + (max_tokens if max_tokens is not None else prompt)


def repair_message(error: str) -> str:
    return (f"Your reply could not be used: {error}. Reply again with only the corrected JSON, "
            "no explanations and no code fences.")


class LLMBackend:
    """Everything but the transport: limits, retries, JSON checks, ledger, budget, batches. Subclasses
    implement `_send`; LLMClient talks HTTP, megasynth.synth.local_backend.LocalBackend runs a checkpoint."""

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


class LLMClient(LLMBackend):
    """The HTTP backend: an `openai.AsyncOpenAI` with its own retries off (ours apply) and our timeout."""

    def __init__(self, settings: LLMSettings, ledger_path: str | os.PathLike | None = None, *,
                 seed: int | None = None, tokenizer=None):
        import openai

        try:  # the HTTP library openai is built on: httpx2 in recent releases, httpx before
            import httpx2 as httpx
        except ImportError:
            import httpx

        key = os.environ.get(settings.api_key_env) or _NO_KEY
        super().__init__(settings, ledger_path, secrets=[key] if key != _NO_KEY else [], seed=seed,
                         tokenizer=tokenizer)
        self._openai, self._httpx = openai, httpx
        self._bounded_stream = _bounded_stream_type(httpx.AsyncByteStream)
        # Several clients with a few connections each: httpcore scans every pooled connection (one poll() each)
        # for every request, so one pool of 64 connections costs more CPU per request than the rest of the
        # client together (bench/llm_client.py). A request goes to the client with the fewest in flight.
        shards = -(-settings.concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-settings.concurrency // shards)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self._apis = [openai.AsyncOpenAI(
            base_url=settings.base_url, api_key=key, max_retries=0, timeout=settings.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=settings.timeout_s,
                                                       event_hooks={"response": [self._bound_body]}))
            for _ in range(shards)]
        self._busy = [0] * shards

    async def aclose(self) -> None:
        try:
            for api in self._apis:
                await api.close()
        finally:
            await super().aclose()

    async def _send(self, kind, payload, sampling, key, attempt):
        openai = self._openai
        body = {"model": self.settings.model, **sampling}
        body.update(body.pop("extra_body", None) or {})  # what openai's create() would merge in
        body["messages" if kind == "chat" else "prompt"] = payload
        try:
            # asyncio.timeout bounds the whole request; httpx's timeout alone is per read, so a server that
            # trickles bytes would never time out. The documented client.post() with a raw response keeps
            # openai's transport, auth and error mapping and skips its request transform and response models,
            # most of its CPU time per request (bench/llm_client.py).
            shard = self._busy.index(min(self._busy))
            self._busy[shard] += 1
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    response = await self._apis[shard].post("/chat/completions" if kind == "chat" else "/completions",
                                                            body=body, cast_to=self._httpx.Response,
                                                            options={"headers": _STREAMED_REPLY})
                    try:
                        data = json.loads(await response.aread())
                    finally:
                        await response.aclose()
            finally:
                self._busy[shard] -= 1
        except (TimeoutError, openai.APITimeoutError):
            raise _Failure("timeout", f"no reply within {self.settings.timeout_s:g} s", retryable=True) from None
        except openai.APIConnectionError as e:
            raise _Failure("connection", f"connection failed: {_cause(e)}", retryable=True) from None
        except openai.APIStatusError as e:
            code = e.status_code
            retryable = code in (408, 429) or code >= 500
            retry_after = retry_after_from_headers(e.response.headers) if retryable else None
            raise _Failure(f"http_{code}", f"HTTP {code}: {e.message}", retryable=retryable,
                           retry_after=retry_after) from None
        except (openai.APIError, ValueError) as e:  # a 200 whose body is not JSON
            raise _Failure("bad_response", f"unreadable response: {type(e).__name__}: {e}", retryable=True) from None
        return _read_response(kind, data, payload)

    async def _bound_body(self, response) -> None:
        """httpx response hook, run before any byte of the body is read (error replies too: openai reads those
        whole): a body over max_reply_bytes fails the request as soon as that many bytes came in (issue 19)."""
        cap = self.settings.max_reply_bytes
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise _Failure("bad_response", f"the reply is compressed ({encoding}) although none was asked for: its "
                           "size in memory cannot be bounded", retryable=False)
        length = response.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > cap:
            raise _Failure("reply_too_large", f"the reply announces {int(length):,} bytes, over --max-reply-bytes "
                           f"{cap:,}", retryable=False)
        response.stream = self._bounded_stream(response.stream, cap)


@functools.cache
def _bounded_stream_type(base: type) -> type:
    """An httpx AsyncByteStream (`base`) that raises _Failure("reply_too_large") past `cap` bytes."""

    class BoundedStream(base):
        def __init__(self, inner, cap: int):
            self._inner, self._cap = inner, cap

        async def __aiter__(self):
            seen = 0
            async for chunk in self._inner:
                seen += len(chunk)
                if seen > self._cap:
                    raise _Failure("reply_too_large", f"the reply body passed --max-reply-bytes {self._cap:,}; "
                                   "abandoned there", retryable=False)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    return BoundedStream


def _token_count(value) -> int | None:
    """A usage count as reported, or None unless it is an int in [0, MAX_USAGE_TOKENS] (bool is not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


def _cause(e: BaseException) -> str:
    root = e.__cause__ or e.__context__
    return f"{type(root).__name__}: {root}" if root is not None else str(e)


def _read_response(kind: str, data, payload) -> tuple[str, Usage, str | None]:
    """(text, usage, finish_reason) from a completion response's JSON; _Failure when it is not one."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        finish = choice.get("finish_reason")
        usage = data.get("usage")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _Failure("bad_response", f"not a {kind} completion response: {str(data)[:200]}", retryable=True) from None
    if finish == "content_filter":
        raise _Failure("content_filter", "the endpoint's content filter withheld the reply", retryable=False)
    # A text completion that stopped at once is a legitimate empty text (a synthesizer that emitted EOD first);
    # an empty chat reply, or one cut off by the length limit, is a failure worth retrying.
    empty_ok = kind == "complete" and finish == "stop"
    if not isinstance(text, str) or (not text and not empty_ok):
        raise _Failure("empty_reply", f"the reply is empty (finish_reason {finish})", retryable=True)
    prompt, completion = ((_token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))
                          if isinstance(usage, dict) else (None, None))
    if prompt is not None and completion is not None:
        counted = Usage(prompt, completion)
    else:  # omitted (some servers) or not a count (issue 19): estimate (chars / 4), so budgets still apply
        counted = Usage(_estimate_tokens(payload, 0), len(text) // 4, estimated=True)
    return text, counted, finish


class Batch:
    """Concurrent keyed requests; see LLMBackend.batch and the module docstring."""

    def __init__(self, backend: LLMBackend, on_result, *, max_pending: int, progress: str | bool):
        self.backend = backend
        self.on_result = on_result
        self._slots = asyncio.Semaphore(max_pending)
        self._tasks: set[asyncio.Task] = set()
        self._keys: set[str] = set()
        self._budget: BudgetExceeded | None = None
        self._error: BaseException | None = None
        self._bar = None
        self._label = progress if isinstance(progress, str) else "llm"
        self._progress = bool(progress)
        self._last_postfix = 0.0
        self.submitted = self.finished = 0

    async def __aenter__(self) -> Self:
        if self._progress:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc=self._label, unit="req", file=sys.stderr, dynamic_ncols=True)
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
        self.finished += 1
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

