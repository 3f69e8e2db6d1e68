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
  batch (megasynth.synth.llm.ledger).

The pieces: this module is LLMClient (the HTTP transport: sending, bounding and reading replies) and re-exports
the rest; megasynth.synth.llm.backend is LLMBackend (the policy above, for any transport), llm_batch the Batch
scheduler, llm_types the request, result and failure types, llm_settings the settings and CLI flags, llm_limits
the rate limits and backoff, llm_json the JSON checks, and megasynth.synth.llm.ledger the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os

from megasynth.synth.llm.ledger import LedgerError
from megasynth.synth.llm.backend import DETAIL_CHARS, LLMBackend, repair_message
from megasynth.synth.llm.batch import Batch
from megasynth.synth.llm.limits import retry_after_from_headers
from megasynth.synth.llm.settings import (
    LLMSettings,
    add_llm_arguments,
    settings_from_args,
)
from megasynth.synth.llm.types import BudgetExceeded, LLMRequest, LLMResult, Usage, _estimate_tokens, _Failure

# This module is where callers import from; the names defined in the modules above are re-exported here.
__all__ = ["DETAIL_CHARS", "Batch", "BudgetExceeded", "LLMBackend", "LLMClient", "LLMRequest", "LLMResult",
           "LLMSettings", "LedgerError", "Usage", "add_llm_arguments", "repair_message", "settings_from_args"]

CONNECTIONS_PER_POOL = 8  # LLMClient spreads its connections over pools of this size (see LLMClient.__init__)
_NO_KEY = "EMPTY"
MAX_USAGE_TOKENS = 100_000_000  # more tokens than one request has ever held: such a count is not a count
# Per request: read the body as a stream (openai returns the httpx response unread) so that _bound_body can stop
# it at max_reply_bytes, and ask for an uncompressed one, whose size on the wire is its size in memory.
_STREAMED_REPLY = {"X-Stainless-Raw-Response": "stream", "Accept-Encoding": "identity"}


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
