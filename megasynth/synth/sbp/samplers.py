"""The two ways megasynth.synth.sbp.synthesize samples a shard: our KV-cache sampler, or an OpenAI-compatible server.

Both take the shard's prompts (token ids: seed tokens + separator) and sample indices, and return per prompt the
generated ids without the stopping EOD and whether it stopped at EOD. How each seeds its samples and reads the
server's replies: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

import numpy as np

from megasynth.generate import generate
from megasynth.synth.llm import LLMClient, LLMRequest
from megasynth.synth.llm.ledger import anomalies_text
from megasynth.synth.workdir import derive_seed, request_key

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
    return derive_seed(seed, "synthesize", sample)


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


class EndpointSampler:
    def __init__(self, endpoint, tokenizer, sampling: Sampling, ledger_path: str | os.PathLike,
                 prompt_format: str = "ids"):
        """`endpoint`: an LLMSettings; `prompt_format`: "ids" (token ids as the prompt) or "text" (decoded)."""
        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        self.endpoint, self.tok, self.sampling = endpoint, tokenizer, sampling
        self.ledger_path, self.prompt_format = ledger_path, prompt_format
        self._anomalies = ""  # the last "endpoint replies corrected" line printed

    def __call__(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        return asyncio.run(self._run(prompts, samples))

    def _request(self, prompt: np.ndarray, sample: int):
        s = self.sampling
        sampling = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                    "seed": endpoint_seed(s.seed, sample)}
        if s.top_k:
            sampling["extra_body"] = {"top_k": s.top_k}  # vLLM's extension of the completions API
        ids = [int(t) for t in prompt]
        text = ids if self.prompt_format == "ids" else self.tok.decode(ids)
        return LLMRequest(key=request_key("synthesize", s.seed, sample), prompt=text, sampling=sampling,
                          meta=sample)

    async def _run(self, prompts: list[np.ndarray], samples: np.ndarray) -> list[Sampled]:
        requests = [self._request(p, int(i)) for p, i in zip(prompts, samples)]
        async with LLMClient(self.endpoint, self.ledger_path, tokenizer=self.tok) as client:
            results = await client.map(requests, progress=False)
            self._report(client.summary())
        return [self._document(results[r.key], r.meta) for r in requests]

    def _report(self, summary: dict) -> None:
        """One stderr line when the ledger's count of corrected replies (cut, API key removed, usage estimated:
        see megasynth.synth.llm.ledger) changed; the sidecar's truncated count covers the cut ones."""
        text = anomalies_text(summary)
        if text and text != self._anomalies:
            self._anomalies = text
            print(f"{self.endpoint.base_url}: endpoint replies corrected so far: {text} (see {self.ledger_path})",
                  file=sys.stderr)

    def _document(self, result, sample: int) -> Sampled:
        eod = self.tok.eod_id
        if not result.ok:
            # An empty completion that stopped at once comes back ok with "" (an empty document, dropped and
            # counted like the local ones); one that stays empty for another reason fails like any request.
            why = (f"the endpoint kept failing transiently for {self.endpoint.transient_budget_s:g} s, "
                   f"{result.attempts} requests" if result.transient else f"{result.attempts} attempts")
            raise EndpointError(f"{self.endpoint.base_url}: sample {sample}: the completion failed ({why}; "
                                f"{result.error}: {result.detail})")
        # The reply is text: a literal "<|endoftext|>" in it stays text; the server's own end of
        # text is its finish_reason. (An EOD id can still appear where the tokenizer's EOD is not a special token.)
        ids = self.tok.encode(result.text, parse_special=False)
        # The client cut a reply over max_tokens (a server may send more than asked) and marked it
        # "length"; its text encodes back to at most a token or so more, so cut the ids too: never a document longer
        # than max_new_tokens, and one cut here counts as truncated like a local one.
        limit = self.sampling.max_new_tokens
        if eod in ids[:limit]:
            return ids[:ids.index(eod)], True
        if len(ids) > limit:
            return ids[:limit], False
        return ids, result.finish_reason != "length"
