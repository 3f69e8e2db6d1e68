"""The values the LLM client hands around: a request (LLMRequest), its outcome (LLMResult, with its Usage), the
budget stop (BudgetExceeded), and the failure of one HTTP request (AttemptFailed) that the retry loop reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megasynth.synth.llm.json_replies import Validator
from megasynth.synth.llm.limits import is_transient


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
    attempts: int = 0  # HTTP requests made (retries, repairs and structured_rejected included)
    transient_failures: int = 0  # of which failed transiently (429, 408, 5xx, timeout, connection)
    transient: bool = False  # not ok because transient failures outlasted transient_budget_s (worth asking again)
    repairs: int = 0  # of which JSON repair requests
    latency_s: float = 0.0  # wall time of the whole item, waits included
    error: str | None = None  # the reason when not ok: timeout, connection, http_429, http_400, invalid_json, ...
    detail: str = ""  # the last error's message (API key scrubbed)
    finish_reason: str | None = None  # the endpoint's, for the last reply ("length": cut at max_tokens)
    cut_to_max_tokens: bool = False  # a reply was longer than max_tokens and was cut to it (finish "length")
    api_key_scrubbed: bool = False  # a reply held the API key, replaced by "***"
    structured_output: bool = False  # the last request asked for schema-constrained JSON (response_format)
    structured_rejected: int = 0  # requests refused for their response_format, sent again at once without it
    server: str | None = None  # the API root of the last request (one of LLMSettings.base_urls)


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


class AttemptFailed(Exception):
    """One failed HTTP request: reason (short, for counting), detail, whether to retry, the server's wait."""

    def __init__(self, reason: str, detail: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after
        self.server = None  # the llm.servers.Server it failed on (set by the client)
        # The endpoint's fault, not the request's: retried within the time budget, not counted as an attempt.
        self.transient = retryable and is_transient(reason)


def estimate_tokens(payload: list[dict] | list[int] | str, max_tokens: int | None) -> int:
    if isinstance(payload, list) and all(isinstance(t, int) for t in payload):  # a prompt given as token ids
        prompt = len(payload)
    else:
        chars = len(payload) if isinstance(payload, str) else sum(len(str(m.get("content") or "")) for m in payload)
        prompt = chars // 4
    return prompt + (max_tokens if max_tokens is not None else prompt)

