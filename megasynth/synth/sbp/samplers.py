"""The two ways megasynth.synth.sbp.synthesize samples a shard: our KV-cache sampler, or an OpenAI-compatible server.

Both take the shard's prompts (token ids: seed tokens + <|sep|>) and sample indices, and return per prompt the
generated ids without the stopping EOD and whether it stopped at EOD (False: it hit max_new_tokens).

- LocalSampler: megasynth.generate.generate on the checkpoint, batches of prompts of similar length (sorted by
  length, then sample index, within the shard: less padding, and a batching that depends on the shard alone).
  Every prompt draws from its own stream seeded by (seed, sample index), so a document does not depend on which
  batch, shard or rank it lands in.
- EndpointSampler: one /v1/completions request per prompt through megasynth.synth.llm.LLMClient (limits,
  retries, ledger), with `seed` = a per-sample seed derived from (seed, sample index) so a server that honours
  it (vLLM does) repeats a sample. The prompt is sent as token ids (vLLM accepts a list of ids as `prompt`:
  exactly our prompt, no re-tokenization) or, with prompt_format="text", as the decoded text. The reply text is
  tokenized with our tokenizer; finish_reason "stop" means the document ended (the server stopped at its EOS,
  which tools/export_hf.py sets to our EOD), "length" that it hit max_tokens. An EOD token inside the text
  ends the document there. A request that still fails after the client's retries stops the run (naming the
  sample and the reason; transient failures, 429/408/5xx/timeouts/dropped connections, are first retried for
  transient_budget_s): the finished shards stay, and a rerun resumes; no sample is ever left out.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

import numpy as np

from megasynth.generate import generate

# A sampled document: (generated ids without the stopping EOD, stopped at EOD).
Sampled = tuple[list[int], bool]


class EndpointError(RuntimeError):
    """A completion request failed for good (after the client's retries); one line naming the sample."""


@dataclass(frozen=True)
class Sampling:
    """What decides a sample besides its prompt (recorded in the manifest and the output sidecar)."""

    seed: int
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int


def endpoint_seed(seed: int, sample: int) -> int:
    """The `seed` of one completion request: a 31-bit function of (seed, sample index) only."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, 0x454E4450, sample]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


class LocalSampler:
    def __init__(self, model, eod_id: int, sampling: Sampling, batch_size: int):
        self.model, self.eod_id, self.sampling, self.batch_size = model, eod_id, sampling, batch_size

    def __call__(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        s = self.sampling
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), int(samples[i])))
        out: list[Sampled | None] = [None] * len(prompts)
        for b in range(0, len(order), self.batch_size):
            batch = order[b:b + self.batch_size]
            gens = generate(self.model, [prompts[i] for i in batch], max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eod_id=self.eod_id,
                            seed=s.seed, row_ids=[int(samples[i]) for i in batch])
            for i, ids in zip(batch, gens):
                ended = bool(ids) and ids[-1] == self.eod_id
                out[i] = (ids[:-1] if ended else ids, ended)
        return out


@dataclass(frozen=True)
class EndpointSettings:
    """How to reach the server (only `url`, `served_model` and `prompt_format` decide the output)."""

    url: str
    served_model: str
    prompt_format: str = "ids"  # "ids" (token ids as the prompt) or "text" (the decoded prompt)
    concurrency: int = 16
    max_attempts: int = 5
    timeout_s: float = 300.0
    api_key_env: str = "OPENAI_API_KEY"
    backoff_base_s: float = 1.0
    transient_budget_s: float = 600.0  # per sample, for 429/408/5xx/timeouts/dropped connections (LLMSettings)

    def describe(self) -> dict:
        return {"url": self.url, "served_model": self.served_model, "prompt_format": self.prompt_format}


class EndpointSampler:
    def __init__(self, endpoint: EndpointSettings, tokenizer, sampling: Sampling, ledger_path: str | os.PathLike,
                 progress: bool = False):
        if endpoint.prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {endpoint.prompt_format!r}")
        self.endpoint, self.tok, self.sampling = endpoint, tokenizer, sampling
        self.ledger_path, self.progress = ledger_path, progress
        self._anomalies = ""  # the last "endpoint replies corrected" line printed

    def __call__(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        return asyncio.run(self._run(prompts, samples))

    def _request(self, prompt: np.ndarray, sample: int):
        from megasynth.synth.llm import LLMRequest  # noqa: PLC0415
        from megasynth.synth.workdir import request_key  # noqa: PLC0415

        s = self.sampling
        sampling = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "seed": endpoint_seed(s.seed, sample)}
        if s.top_k:
            sampling["extra_body"] = {"top_k": s.top_k}  # vLLM's extension of the completions API
        ids = [int(t) for t in prompt]
        text = ids if self.endpoint.prompt_format == "ids" else self.tok.decode(ids)
        return LLMRequest(key=request_key("synthesize", s.seed, sample), prompt=text, sampling=sampling,
                          meta=sample)

    async def _run(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        from megasynth.synth.llm import LLMClient, LLMSettings  # noqa: PLC0415

        e = self.endpoint
        settings = LLMSettings(base_url=e.url, model=e.served_model, api_key_env=e.api_key_env,
                               concurrency=e.concurrency, max_attempts=e.max_attempts, timeout_s=e.timeout_s,
                               backoff_base_s=e.backoff_base_s, transient_budget_s=e.transient_budget_s)
        requests = [self._request(p, int(i)) for p, i in zip(prompts, samples)]
        async with LLMClient(settings, self.ledger_path, tokenizer=self.tok) as client:
            results = await client.map(requests, progress=False)
            self._report(client.summary())
        return [self._document(results[r.key], r.meta) for r in requests]

    def _report(self, summary: dict) -> None:
        """One stderr line when the ledger's count of corrected replies (cut, API key removed, usage estimated:
        issue 19) changed; the sidecar's truncated count covers the cut ones."""
        from megasynth.synth.llm.ledger import anomalies_text  # noqa: PLC0415

        text = anomalies_text(summary)
        if text and text != self._anomalies:
            self._anomalies = text
            print(f"{self.endpoint.url}: endpoint replies corrected so far: {text} (see {self.ledger_path})",
                  file=sys.stderr)

    def _document(self, result, sample: int) -> Sampled:
        eod = self.tok.eod_id
        if not result.ok:
            # An empty completion that stopped at once comes back ok with "" (an empty document, dropped and
            # counted like the local ones); one that stays empty for another reason fails like any request.
            why = (f"the endpoint kept failing transiently for {self.endpoint.transient_budget_s:g} s, "
                   f"{result.attempts} requests" if result.transient else f"{result.attempts} attempts")
            raise EndpointError(f"{self.endpoint.url}: sample {sample}: the completion failed ({why}; "
                                f"{result.error}: {result.detail})")
        # The reply is text: a literal "<|endoftext|>" in it stays text (issue 19); the server's own end of
        # text is its finish_reason. (An EOD id can still appear where the tokenizer's EOD is not a special token.)
        ids = self.tok.encode(result.text, parse_special=False)
        # The client cut a reply over max_tokens (issue 19: a server may send more than asked) and marked it
        # "length"; its text encodes back to at most a token or so more, so cut the ids too: never a document longer
        # than max_new_tokens, and one cut here counts as truncated like a local one.
        limit = self.sampling.max_new_tokens
        if eod in ids[:limit]:
            return ids[:ids.index(eod)], True
        if len(ids) > limit:
            return ids[:limit], False
        return ids, result.finish_reason != "length"
