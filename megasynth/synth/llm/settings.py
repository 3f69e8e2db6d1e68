"""Settings of the LLM client (megasynth.synth.llm) and the command-line flags every LLM tool shares.

    parser = argparse.ArgumentParser(); add_llm_arguments(parser)     # --base-url --model --api-key-env ...
    settings = settings_from_args(parser.parse_args())               # an LLMSettings
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from urllib.parse import urlsplit

from megasynth.cli import nonnegative_float, positive_float

STRUCTURED_OUTPUT_MODES = ("auto", "on", "off")


def split_base_urls(value: str, what: str = "base_url") -> list[str]:
    """The API roots named in `value` (comma-separated), each checked: an http(s) URL with a host, none twice.
    ValueError names `what` (the field or the flag) and the URL at fault."""
    urls = [u.strip().rstrip("/") for u in str(value).split(",")]
    if not any(urls):
        raise ValueError(f"{what}: no URL given (expected e.g. http://localhost:8000/v1)")
    for url in urls:
        parts = urlsplit(url) if url else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{what}: {url!r} is not an http(s) URL of an API root (expected e.g. "
                             "http://localhost:8000/v1; several servers: comma-separated)")
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise ValueError(f"{what}: {twice[0]} is named more than once")
    return urls


@dataclass
class LLMSettings:
    """How to reach the endpoint and how hard to push it."""

    base_url: str = "http://localhost:8000/v1"
    """The OpenAI-compatible API root, ending in /v1 (OpenAI: https://api.openai.com/v1); several servers of the
    same model (a fleet of `vllm serve` processes, no load balancer): their roots comma-separated (`base_urls`)."""
    model: str = ""
    """The model name the endpoint serves (vLLM: the --served-model-name, OpenAI: e.g. gpt-4o-mini)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key; the key itself is never stored, logged or printed."""
    concurrency: int = 16
    """Most HTTP requests in flight at once per server (so several servers take concurrency * servers)."""
    requests_per_minute: float | None = None
    """Requests-per-minute limit (token bucket, a few seconds of burst); None: unlimited."""
    tokens_per_minute: float | None = None
    """Tokens-per-minute limit; a request is charged prompt chars / 4 + max_tokens before it is sent and
    corrected with the reported usage afterwards. None: unlimited."""
    max_attempts: int = 5
    """Most HTTP requests per item that got a reply (the first, retries after unreadable or empty replies, JSON
    repairs), then the item fails with the reason; transient failures do not count (docs/synth.md)."""
    transient_budget_s: float = 600.0
    """Seconds an item keeps retrying transient failures, counted from its first one; then it fails marked
    transient (a plain rerun asks again). 0: a transient failure ends the item at once."""
    timeout_s: float = 60.0
    """Seconds one HTTP request may take before it is abandoned (and retried)."""
    max_reply_bytes: int = 4 * 1024 * 1024
    """Most bytes of one HTTP reply body (errors included); a longer one is abandoned as it streams in (reason
    "reply_too_large"). A reply of max_tokens tokens is a few kB of JSON, so the default is ample."""
    backoff_base_s: float = 1.0
    """Backoff after the n-th failed attempt: uniform in [0, min(backoff_max_s, backoff_base_s * 2**(n-1))]."""
    backoff_max_s: float = 60.0
    """Cap of the backoff wait (a server's Retry-After may be longer: docs/synth.md, "Retry policy")."""
    json_repair_attempts: int = 2
    """Repair requests allowed after a reply that is not valid JSON for the schema."""
    temperature: float | None = None
    """Default sampling temperature (None: the endpoint's default); a call's own temperature= wins."""
    max_tokens: int | None = None
    """Default most completion tokens per request (None: the endpoint's default); a call's max_tokens= wins."""
    price_in_per_m: float = 0.0
    """US dollars per million prompt tokens, for the cost estimate and budget_usd."""
    price_out_per_m: float = 0.0
    """US dollars per million completion tokens."""
    budget_tokens: int | None = None
    """Stop starting requests once this many tokens (prompt + completion, whole ledger) are spent."""
    budget_usd: float | None = None
    """Stop starting requests once the estimated cost (whole ledger) reaches this many dollars."""
    structured_output: str = "auto"
    """Requests with a schema ask for schema-constrained JSON (response_format json_schema): "auto" (default) sends
    it and drops it for good on a server that rejects it, "on" sends it (a rejection is a failure), "off" never
    sends it (the prompt and the repairs alone). The reply is checked against the schema either way."""
    server_cooldown_s: float = 30.0
    """With several servers: seconds a server that failed transiently (timeouts, dropped connections, 5xx)
    SERVER_FAILURES_IN_ROW times in a row stays out of rotation before one request probes it again."""

    @property
    def base_urls(self) -> list[str]:
        """The API roots base_url names (one, or several comma-separated), checked."""
        return split_base_urls(self.base_url)

    def __post_init__(self):
        if self.base_url is not None:  # None: a tool's optional endpoint that was not given (JUDGE_DEFAULTS)
            split_base_urls(self.base_url, "LLMSettings.base_url")
        if self.structured_output not in STRUCTURED_OUTPUT_MODES:
            raise ValueError(f"LLMSettings: structured_output must be one of {', '.join(STRUCTURED_OUTPUT_MODES)}, "
                             f"got {self.structured_output!r}")
        if self.server_cooldown_s < 0:
            raise ValueError(f"LLMSettings: server_cooldown_s must be >= 0, got {self.server_cooldown_s}")
        if self.concurrency < 1 or self.max_attempts < 1 or self.json_repair_attempts < 0:
            raise ValueError("LLMSettings: need concurrency >= 1, max_attempts >= 1, json_repair_attempts >= 0; got "
                             f"{self.concurrency}, {self.max_attempts}, {self.json_repair_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"LLMSettings: timeout_s must be > 0, got {self.timeout_s}")
        if self.max_reply_bytes < 1024:
            raise ValueError(f"LLMSettings: max_reply_bytes must be >= 1024, got {self.max_reply_bytes}")
        if self.transient_budget_s < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("LLMSettings: transient_budget_s, backoff_base_s and backoff_max_s must be >= 0; got "
                             f"{self.transient_budget_s}, {self.backoff_base_s}, {self.backoff_max_s}")


def add_llm_arguments(parser: argparse.ArgumentParser, prefix: str = "", required: bool = True,
                      title: str = "LLM endpoint", *, defaults: LLMSettings | None = None,
                      aliases: dict[str, tuple[str, ...]] | None = None, omit: tuple[str, ...] = (),
                      helps: dict[str, str] | None = None) -> argparse._ArgumentGroup:
    """The endpoint flags every tool that calls an LLM shares; read them back with settings_from_args. `prefix`
    names a second endpoint of the same tool ("judge-" gives --judge-base-url, --judge-model, ...); with
    required=False the endpoint is optional (no --base-url: no LLM calls). `defaults`: the tool's defaults (an
    LLMSettings); `aliases`: more option strings of a flag, e.g. {"model": ("--served-model",)}; `omit`: flags the
    tool does not take (the fields keep their defaults); `helps`: a tool's own help text of a flag. Returns the
    argument group, for a tool's own endpoint flags."""
    group = parser.add_argument_group(title)

    def flag(name: str, *args, **kwargs):
        if name in omit:
            return
        if kwargs.get("required"):
            kwargs["required"] = required
        if helps and name in helps:
            kwargs["help"] = helps[name]
        group.add_argument(f"--{prefix}{name}", *(aliases or {}).get(name, ()), *args, **kwargs)

    d = defaults or LLMSettings()
    flag("base-url", required=True, action=_JoinURLs, metavar="URL[,URL...]",
         help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (vLLM/SGLang) or https://api.openai.com/v1; "
              "several servers of the same model (no load balancer needed): comma-separated, or the flag repeated. "
              "Requests go to the server with the fewest in flight; one that keeps failing is left out for a while "
              "and its failed requests are retried on the others at once")
    flag("model", required=True, help="model name as the endpoint knows it")
    flag("api-key-env", default=d.api_key_env, help=f"environment variable that holds the API key (default "
         f"{d.api_key_env}; unset: the placeholder 'EMPTY' that vLLM accepts). The key is never written anywhere")
    flag("concurrency", type=int, default=d.concurrency,
         help=f"most requests in flight per server (default {d.concurrency})")
    flag("rpm", type=positive_float, default=d.requests_per_minute, help="requests-per-minute limit (default: none)")
    flag("tpm", type=positive_float, default=d.tokens_per_minute,
         help="tokens-per-minute limit, counting prompt and completion tokens (default: none)")
    flag("max-attempts", type=int, default=d.max_attempts, help="most requests per item that got a reply, JSON "
         "repairs and retries after empty or unreadable replies included; then the item is recorded as failed, and "
         "only --retry-failed asks again. Transient failures (429, 408, 5xx, timeouts, dropped connections) do not "
         f"count: see --transient-budget-s (default {d.max_attempts})")
    flag("transient-budget-s", type=nonnegative_float, default=d.transient_budget_s, metavar="S",
         help="seconds an item keeps retrying transient failures, with backoff or the server's Retry-After, from "
         "its first one; then it is recorded as a transient failure, which a plain rerun asks for again (default "
         f"{d.transient_budget_s:g})")
    flag("backoff-base-s", type=nonnegative_float, default=d.backoff_base_s, metavar="S",
         help="the n-th retry waits uniform [0, min(max, base * 2**(n-1))] seconds when the server names no "
         f"Retry-After (default {d.backoff_base_s:g})")
    flag("backoff-max-s", type=nonnegative_float, default=d.backoff_max_s, metavar="S",
         help=f"cap of that wait (default {d.backoff_max_s:g})")
    flag("timeout", type=positive_float, default=d.timeout_s,
         help=f"seconds per HTTP request (default {d.timeout_s:g})")
    flag("max-reply-bytes", type=int, default=d.max_reply_bytes, metavar="N", help="most bytes of one reply body; "
         f"a longer one is abandoned while it streams in and the item fails as reply_too_large (default "
         f"{d.max_reply_bytes:,})")
    flag("temperature", type=nonnegative_float, default=d.temperature,
         help="sampling temperature (default: the tool's or the endpoint's)")
    flag("max-tokens", type=int, default=d.max_tokens,
         help="most completion tokens per request (default: the tool's or the endpoint's)")
    flag("price-in", type=nonnegative_float, default=d.price_in_per_m,
         help="US$ per million prompt tokens, for the cost estimate and --budget-usd (default 0)")
    flag("price-out", type=nonnegative_float, default=d.price_out_per_m,
         help="US$ per million completion tokens (default 0)")
    flag("budget-tokens", type=int, default=d.budget_tokens, help="stop cleanly once this many tokens are spent "
         "(prompt + completion, counted over the whole ledger, so a resumed run continues the count)")
    flag("budget-usd", type=nonnegative_float, default=d.budget_usd,
         help="stop cleanly once the estimated cost reaches this (needs --price-in/--price-out)")
    flag("structured-output", choices=STRUCTURED_OUTPUT_MODES, default=d.structured_output,
         help="JSON requests ask the server for schema-constrained output (response_format json_schema; vLLM, "
              "OpenAI): auto sends it and stops sending it to a server that rejects it (said once on stderr), on "
              "treats a rejection as a failure, off never sends it. Replies are checked against the schema and "
              f"repaired either way (default {d.structured_output})")
    flag("server-cooldown-s", type=nonnegative_float, default=d.server_cooldown_s, metavar="S",
         help="with several --base-url servers: seconds a server that failed transiently several times in a row "
              f"stays out of rotation before one request probes it again (default {d.server_cooldown_s:g})")
    return group


class _JoinURLs(argparse.Action):
    """--base-url given several times: the URLs joined with commas (LLMSettings.base_url's form of a fleet)."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if before in (None, self.default) else f"{before},{values}")


def settings_from_args(args: argparse.Namespace, prefix: str = "", **overrides) -> LLMSettings:
    """LLMSettings from add_llm_arguments' flags (with the same `prefix`); `overrides` set fields the flags do not
    cover."""
    def get(name: str):
        return getattr(args, (prefix + name).replace("-", "_"), _OMITTED)

    if get("budget_usd") not in (None, _OMITTED) and get("price_in") == 0 and get("price_out") == 0:
        raise ValueError(f"--{prefix}budget-usd needs --{prefix}price-in and/or --{prefix}price-out (the cost is "
                         "estimated from them)")
    if get("base_url") not in (None, _OMITTED):
        split_base_urls(get("base_url"), f"--{prefix}base-url")  # the error names the flag, not the field
    fields = {f.name: get(_FLAGS.get(f.name, f.name)) for f in dataclasses.fields(LLMSettings)}
    # Fields without a flag (json_repair_attempts), and flags the tool omits, keep their defaults.
    fields = {k: v for k, v in fields.items() if v is not _OMITTED}
    fields.update(overrides)
    return LLMSettings(**fields)


_OMITTED = object()
# The fields whose flag is not named after them.
_FLAGS = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "timeout_s": "timeout", "price_in_per_m": "price_in",
          "price_out_per_m": "price_out"}
