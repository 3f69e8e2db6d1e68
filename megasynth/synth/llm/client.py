"""Async client for any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, a local server) or a fleet of them:
limits, retries, JSON replies (schema-constrained where the server supports it) checked against a schema with
bounded repairs, an append-only ledger, and a budget.

    settings = LLMSettings(base_url="http://localhost:8000/v1", model="Qwen/Qwen3-8B", concurrency=32)
    # a fleet: base_url="http://gpu1:8000/v1,http://gpu2:8000/v1" (concurrency per server)
    async with LLMClient(settings, ledger_path="W/ledger.jsonl") as client:
        r = await client.chat("doc7/entities", [{"role": "user", "content": prompt}], schema=ENTITIES)
        r.ok, r.text, r.parsed, r.usage, r.attempts, r.error      # never raises for a failed request
        r = await client.complete("seed12", "Once upon a time", max_tokens=256)   # base models (/v1/completions)
        async with client.batch(on_result, progress="label") as batch: await batch.submit(LLMRequest(...))

Policy (retries, JSON repairs, structured output, several servers, budget, the API key, hostile replies, batches):
docs/synth.md, "The LLM client"."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable

from megasynth.synth.llm.batch import Batch
from megasynth.synth.llm.json_replies import Validator, check_reply, response_format
from megasynth.synth.llm.ledger import Ledger
from megasynth.synth.llm.limits import TokenBucket, backoff_delay, retry_after_from_headers
from megasynth.synth.llm.responses import bounded_stream_type, cause_text, read_response
from megasynth.synth.llm.servers import Server, ServerPool
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.llm.types import AttemptFailed, BudgetExceeded, LLMRequest, LLMResult, Usage, estimate_tokens

DETAIL_CHARS = 300  # error details in results and the ledger are cut to this length
CONNECTIONS_PER_POOL = 8  # LLMClient spreads its connections over pools of this size (see LLMClient.__init__)
_NO_KEY = "EMPTY"
# Per request: read the body as a stream (openai returns the httpx response unread) so that _bound_body can stop
# it at max_reply_bytes, and ask for an uncompressed one, whose size on the wire is its size in memory.
_STREAMED_REPLY = {"X-Stainless-Raw-Response": "stream", "Accept-Encoding": "identity"}
# How servers without structured output refuse a request that asks for it (vLLM and OpenAI answer 400 for a
# schema they cannot take; others 422 for an unknown field, or 404).
_FORMAT_REJECTIONS = ("http_400", "http_404", "http_422")


def repair_message(error: str) -> str:
    return (f"Your reply could not be used: {error}. Reply again with only the corrected JSON, "
            "no explanations and no code fences.")


class LLMClient:
    """`openai.AsyncOpenAI` clients per server (their own retries off: ours apply, with our timeout) and the policy
    above."""

    def __init__(self, settings: LLMSettings, ledger_path: str | os.PathLike | None = None, *,
                 seed: int | None = None, tokenizer=None):
        import openai

        try:  # the HTTP library openai is built on: httpx2 in recent releases, httpx before
            import httpx2 as httpx
        except ImportError:
            import httpx

        key = os.environ.get(settings.api_key_env) or _NO_KEY
        self.settings = settings
        # The output tokenizer (megasynth.tokenizer.Tokenizer), if any: replies are counted against max_tokens in it.
        self.reply_tokenizer = tokenizer
        self._secrets = [key] if key != _NO_KEY else []
        self.ledger = Ledger(ledger_path, price_in_per_m=settings.price_in_per_m,
                             price_out_per_m=settings.price_out_per_m)
        self._rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self._tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self._rng = random.Random(seed)
        self._openai, self._httpx = openai, httpx
        self._bounded_stream = bounded_stream_type(httpx.AsyncByteStream)
        # Per server, several clients with a few connections each: httpcore scans every pooled connection (one
        # poll() each) for every request, so one pool of 64 connections costs more CPU per request than the rest of
        # the client together (bench/llm_client.py). A request goes to the server's client with the fewest in flight.
        shards = -(-settings.concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-settings.concurrency // shards)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)

        def pools(url: str) -> list:
            return [openai.AsyncOpenAI(
                base_url=url, api_key=key, max_retries=0, timeout=settings.timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=settings.timeout_s,
                                                           event_hooks={"response": [self._bound_body]}))
                for _ in range(shards)]

        self.servers = ServerPool(settings.base_urls, concurrency=settings.concurrency,
                                  cooldown_s=settings.server_cooldown_s, make_apis=pools, scrub=self.scrub)

    async def aclose(self) -> None:
        try:
            for api in self.servers.apis():
                await api.close()
        finally:
            self.ledger.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- public interface ----------------------------------------------------------------------------------------
    async def chat(self, key: str, messages: list[dict], *, schema: dict | None = None,
                   validate: Validator | None = None, **sampling) -> LLMResult:
        """A chat completion for `messages` (policy: docs/synth.md, "The LLM client")."""
        return await self._item("chat", key, list(messages), schema, validate, sampling)

    async def complete(self, key: str, prompt: str, *, schema: dict | None = None, validate: Validator | None = None,
                       **sampling) -> LLMResult:
        """A text completion of `prompt` (base models behind /v1/completions)."""
        return await self._item("complete", key, prompt, schema, validate, sampling)

    async def run(self, request: LLMRequest) -> LLMResult:
        chat = request.messages is not None
        return await self._item("chat" if chat else "complete", request.key,
                                list(request.messages) if chat else request.prompt, request.schema, request.validate,
                                request.sampling)

    def batch(self, on_result: Callable[[LLMRequest, LLMResult], Awaitable[None] | None] | None = None, *,
              max_pending: int | None = None, progress: str | bool = False) -> Batch:
        """A context manager running submitted requests concurrently (docs/synth.md, "Batches")."""
        slots = self.settings.concurrency * len(self.servers.servers)
        return Batch(self, on_result, max_pending=max_pending or 4 * slots, progress=progress)

    async def map(self, requests: Iterable[LLMRequest], on_result=None, *, progress: str | bool = False
                  ) -> dict[str, LLMResult]:
        """Run every request; returns {key: result} (docs/synth.md, "Batches")."""
        results: dict[str, LLMResult] = {}

        def collect(request, result):
            results[request.key] = result
            return None if on_result is None else on_result(request, result)  # the batch awaits an awaitable

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

    async def _item(self, kind: str, key: str, payload, schema, validate, sampling) -> LLMResult:
        started = time.monotonic()
        sampling = dict(sampling)
        for name in ("temperature", "max_tokens"):  # the settings' defaults; a call's own value wins
            if getattr(self.settings, name) is not None:
                sampling.setdefault(name, getattr(self.settings, name))
        result = LLMResult(key=key, ok=False)
        wants_json = schema is not None or validate is not None
        max_attempts = self.settings.max_attempts
        first_transient: float | None = None  # when the item's first transient failure came back
        avoid: Server | None = None  # the server of a transient failure, while another one can take the retry
        # Past max_attempts requests that got a reply, result.error / detail hold the last failure.
        while result.attempts - result.transient_failures - result.structured_rejected < max_attempts:
            try:
                text, usage, finish = await self._attempt(kind, payload, sampling, schema, result, avoid)
            except BudgetExceeded:
                if result.attempts:
                    result.error, result.detail = "budget", "stopped by the budget before the item finished"
                    await self._ledger(result, started, outcome="budget", schema=schema is not None)
                raise
            except AttemptFailed as f:
                result.error, result.detail = f.reason, self.scrub(f.detail)[:DETAIL_CHARS]
                result.transient, avoid = f.transient, None
                if f.transient:
                    result.transient_failures += 1
                    now = time.monotonic()
                    first_transient = now if first_transient is None else first_transient
                    left = self.settings.transient_budget_s - (now - first_transient)
                    if f.server is not None and self.servers.other_available(f.server):
                        wait, avoid = 0.0, f.server  # another server takes the retry at once
                    else:  # (a 429's Retry-After paused its server: every request there waits, ServerPool.failed)
                        wait = f.retry_after if f.retry_after is not None else min(left, backoff_delay(
                            result.transient_failures, self.settings.backoff_base_s, self.settings.backoff_max_s,
                            self._rng))
                    if left <= 0 or wait > left:
                        break  # out of budget (or told to come back after it): transient, a rerun asks again
                elif not f.retryable or (result.attempts - result.transient_failures - result.structured_rejected
                                         >= max_attempts):
                    break
                else:
                    wait = backoff_delay(result.attempts - result.transient_failures, self.settings.backoff_base_s,
                                         self.settings.backoff_max_s, self._rng)
                if wait > 0:
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
        await self._ledger(result, started, outcome="ok" if result.ok else "failed", schema=schema is not None)
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

    async def _attempt(self, kind, payload, sampling, schema, result: LLMResult, avoid: Server | None
                       ) -> tuple[str, Usage, str | None]:
        """Wait for the limits and a server's slot, check the budget, send one request (two when a server refuses
        response_format), correct the tokens-per-minute charge, tell the pool how the server did."""
        estimate = estimate_tokens(payload, sampling.get("max_tokens")) if self._tpm else 0
        if self._rpm:
            await self._rpm.acquire(1)
        if self._tpm:
            await self._tpm.acquire(estimate)
        server = await self.servers.acquire(avoid)
        try:
            # Checked with the slot held, right before sending: a request that waited for a slot sees what the
            # requests before it spent.
            if self.budget_reached:
                if self._tpm:
                    self._tpm.adjust(estimate)
                raise BudgetExceeded(f"budget reached: {self.progress_text()}")
            result.attempts += 1
            result.server = server.url
            try:
                text, usage, finish = await self._send_to(server, kind, payload, sampling, schema, result)
            except AttemptFailed as f:
                f.server = server
                self.servers.failed(server, f)
                if self._tpm:
                    self._tpm.adjust(estimate)  # nothing was generated: give the charge back
                raise
            self.servers.succeeded(server)
        finally:
            self.servers.release(server)
        if self._tpm:
            self._tpm.adjust(estimate - usage.total)
        return text, usage, finish

    async def _send_to(self, server: Server, kind, payload, sampling, schema, result: LLMResult
                       ) -> tuple[str, Usage, str | None]:
        """One request, with response_format when there is a schema and structured output is on for `server`; in
        "auto", a server that refuses it (400/404/422) gets the same request at once without it, and once that one
        gets through it is marked as not supporting it (said once)."""
        mode = self.settings.structured_output
        result.structured_output = schema is not None and mode != "off" and server.structured
        if not result.structured_output:
            return await self._send(server, kind, payload, sampling)
        try:
            return await self._send(server, kind, payload, sampling, response_format(schema))
        except AttemptFailed as f:
            if mode == "on" or f.reason not in _FORMAT_REJECTIONS:
                raise
            rejection = f
        result.structured_output = False
        result.attempts += 1
        out = await self._send(server, kind, payload, sampling)  # failing too: the request, not the format, is bad
        result.structured_rejected += 1
        if server.structured:
            server.structured = False
            print(f"{server.url}: the server refused response_format ({self.scrub(rejection.detail)[:200]}) and took "
                  "the request without it: JSON requests go there without structured output from now on, their "
                  "replies checked and repaired as before (--structured-output off skips the try)", file=sys.stderr)
        return out

    async def _ledger(self, result: LLMResult, started: float, *, outcome: str, schema: bool) -> None:
        """The item's ledger line, on disk before the result goes anywhere (LedgerError when it cannot be)."""
        result.latency_s = time.monotonic() - started
        flags = {"usage_estimated": result.usage.estimated, "cut_to_max_tokens": result.cut_to_max_tokens,
                 "api_key_scrubbed": result.api_key_scrubbed, "structured_output_rejected": result.structured_rejected}
        more = {"structured_output": result.structured_output} if schema else {}
        if self.servers.several:
            more["server"] = result.server
        await self.ledger.record_durable({"key": result.key, "model": self.settings.model, "outcome": outcome,
                                          "attempts": result.attempts, "repairs": result.repairs,
                                          "prompt_tokens": result.usage.prompt_tokens,
                                          "completion_tokens": result.usage.completion_tokens,
                                          "latency_s": round(result.latency_s, 4), "error": result.error,
                                          "transient": result.transient,
                                          "detail": result.detail or None, **more,
                                          **{k: True for k, v in flags.items() if v}})

    async def _send(self, server: Server, kind: str, payload, sampling: dict, structured: dict | None = None
                    ) -> tuple[str, Usage, str | None]:
        """One HTTP request to `server` (`structured`: its response_format): (text, usage, finish_reason), or
        AttemptFailed."""
        openai = self._openai
        body = {"model": self.settings.model, **sampling}
        body.update(body.pop("extra_body", None) or {})  # what openai's create() would merge in
        if structured is not None:
            body["response_format"] = structured
        body["messages" if kind == "chat" else "prompt"] = payload
        try:
            # asyncio.timeout bounds the whole request; httpx's timeout alone is per read, so a server that
            # trickles bytes would never time out. The documented client.post() with a raw response keeps
            # openai's transport, auth and error mapping and skips its request transform and response models,
            # most of its CPU time per request (bench/llm_client.py).
            shard = server.shard()
            server.busy[shard] += 1
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    response = await server.apis[shard].post(
                        "/chat/completions" if kind == "chat" else "/completions", body=body,
                        cast_to=self._httpx.Response, options={"headers": _STREAMED_REPLY})
                    try:
                        data = json.loads(await response.aread())
                    finally:
                        await response.aclose()
            finally:
                server.busy[shard] -= 1
        except (TimeoutError, openai.APITimeoutError):
            raise AttemptFailed("timeout", f"no reply within {self.settings.timeout_s:g} s", retryable=True) from None
        except openai.APIConnectionError as e:
            raise AttemptFailed("connection", f"connection failed: {cause_text(e)}", retryable=True) from None
        except openai.APIStatusError as e:
            code = e.status_code
            retryable = code in (408, 429) or code >= 500
            retry_after = retry_after_from_headers(e.response.headers) if retryable else None
            raise AttemptFailed(f"http_{code}", f"HTTP {code}: {e.message}", retryable=retryable,
                                retry_after=retry_after) from None
        except (openai.APIError, ValueError) as e:  # a 200 whose body is not JSON
            raise AttemptFailed("bad_response", f"unreadable response: {type(e).__name__}: {e}",
                                retryable=True) from None
        return read_response(kind, data, payload)

    async def _bound_body(self, response) -> None:
        """httpx response hook, run before any byte of the body is read (error replies too: openai reads those
        whole): a body over max_reply_bytes fails the request as soon as that many bytes came in."""
        cap = self.settings.max_reply_bytes
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise AttemptFailed("bad_response", f"the reply is compressed ({encoding}) although none was asked for: "
                                "its size in memory cannot be bounded", retryable=False)
        length = response.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > cap:
            raise AttemptFailed("reply_too_large", f"the reply announces {int(length):,} bytes, over "
                                f"--max-reply-bytes {cap:,}", retryable=False)
        response.stream = self._bounded_stream(response.stream, cap)
