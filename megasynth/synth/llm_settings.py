"""Settings of the LLM client (megasynth.synth.llm) and the command-line flags every LLM tool shares.

    parser = argparse.ArgumentParser(); add_llm_arguments(parser)     # --base-url --model --api-key-env ...
    settings = settings_from_args(parser.parse_args())               # an LLMSettings
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class LLMSettings:
    """How to reach the endpoint and how hard to push it."""

    base_url: str = "http://localhost:8000/v1"
    """The OpenAI-compatible API root, ending in /v1 (OpenAI: https://api.openai.com/v1)."""
    model: str = ""
    """The model name the endpoint serves (vLLM: the --served-model-name, OpenAI: e.g. gpt-4o-mini)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key; the key itself is never stored, logged or printed."""
    concurrency: int = 16
    """Most HTTP requests in flight at once."""
    requests_per_minute: float | None = None
    """Requests-per-minute limit (token bucket, a few seconds of burst); None: unlimited."""
    tokens_per_minute: float | None = None
    """Tokens-per-minute limit; a request is charged prompt chars / 4 + max_tokens before it is sent and
    corrected with the reported usage afterwards. None: unlimited."""
    max_attempts: int = 5
    """Most HTTP requests per item, retries and JSON repairs included; then the item fails with the reason."""
    timeout_s: float = 60.0
    """Seconds one HTTP request may take before it is abandoned (and retried)."""
    backoff_base_s: float = 1.0
    """Backoff after the n-th failed attempt: uniform in [0, min(backoff_max_s, backoff_base_s * 2**(n-1))]."""
    backoff_max_s: float = 60.0
    """Cap of the backoff wait (a server's Retry-After is honoured even when longer, up to 10 minutes)."""
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

    def __post_init__(self):
        if self.concurrency < 1 or self.max_attempts < 1 or self.json_repair_attempts < 0:
            raise ValueError("LLMSettings: need concurrency >= 1, max_attempts >= 1, json_repair_attempts >= 0; got "
                             f"{self.concurrency}, {self.max_attempts}, {self.json_repair_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"LLMSettings: timeout_s must be > 0, got {self.timeout_s}")


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint flags every tool that calls an LLM shares; read them back with settings_from_args."""
    g = parser.add_argument_group("LLM endpoint")
    d = LLMSettings()
    g.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 "
                   "(vLLM/SGLang) or https://api.openai.com/v1")
    g.add_argument("--model", required=True, help="model name as the endpoint knows it")
    g.add_argument("--api-key-env", default=d.api_key_env, help="environment variable that holds the API key "
                   f"(default {d.api_key_env}; unset: the placeholder 'EMPTY' that vLLM accepts). The key is never "
                   "written anywhere")
    g.add_argument("--concurrency", type=int, default=d.concurrency, help=f"most requests in flight (default "
                   f"{d.concurrency})")
    g.add_argument("--rpm", type=float, default=None, help="requests-per-minute limit (default: none)")
    g.add_argument("--tpm", type=float, default=None, help="tokens-per-minute limit, counting prompt and completion "
                   "tokens (default: none)")
    g.add_argument("--max-attempts", type=int, default=d.max_attempts, help="most HTTP requests per item, retries "
                   f"and JSON repairs included; then the item is recorded as failed (default {d.max_attempts})")
    g.add_argument("--timeout", type=float, default=d.timeout_s, help=f"seconds per HTTP request (default "
                   f"{d.timeout_s:g})")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the tool's or "
                   "the endpoint's)")
    g.add_argument("--max-tokens", type=int, default=None, help="most completion tokens per request (default: the "
                   "tool's or the endpoint's)")
    g.add_argument("--price-in", type=float, default=0.0, help="US$ per million prompt tokens, for the cost "
                   "estimate and --budget-usd (default 0)")
    g.add_argument("--price-out", type=float, default=0.0, help="US$ per million completion tokens (default 0)")
    g.add_argument("--budget-tokens", type=int, default=None, help="stop cleanly once this many tokens are spent "
                   "(prompt + completion, counted over the whole ledger, so a resumed run continues the count)")
    g.add_argument("--budget-usd", type=float, default=None, help="stop cleanly once the estimated cost reaches this "
                   "(needs --price-in/--price-out)")


def settings_from_args(args: argparse.Namespace, **overrides) -> LLMSettings:
    """LLMSettings from add_llm_arguments' flags; `overrides` set fields the flags do not cover."""
    if args.budget_usd is not None and args.price_in == 0 and args.price_out == 0:
        raise ValueError("--budget-usd needs --price-in and/or --price-out (the cost is estimated from them)")
    fields = {"base_url": args.base_url, "model": args.model, "api_key_env": args.api_key_env,
              "concurrency": args.concurrency, "requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
              "max_attempts": args.max_attempts, "timeout_s": args.timeout, "temperature": args.temperature,
              "max_tokens": args.max_tokens, "price_in_per_m": args.price_in, "price_out_per_m": args.price_out,
              "budget_tokens": args.budget_tokens, "budget_usd": args.budget_usd}
    fields.update(overrides)
    return LLMSettings(**fields)
