"""Batched log-likelihood of continuations given contexts: the scoring primitive of multiple-choice evaluation.

    scores = score_continuations(model, [(context_ids, continuation_ids), ...], batch_size=16)
    scores[i].logprob     # sum over the continuation's tokens of log p(token | everything before it)
    scores[i].is_greedy   # every continuation token was the argmax at its position

Batching, padding and truncation: docs/eval.md ("Scoring").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megasynth.model import Transformer


@dataclass
class Score:
    logprob: float
    is_greedy: bool
    num_tokens: int


@torch.no_grad()
def score_continuations(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 16, max_len: int | None = None) -> list[Score]:
    """Score each (context, continuation) pair of token-id lists; see docs/eval.md ("Scoring")."""
    max_len = max_len or model.cfg.max_seq_len
    device = model.embed_tokens.weight.device
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: the continuation is empty (nothing to score)")
        if not ctx:
            raise ValueError(f"request {i}: the context is empty (start it with a BOS or EOD token)")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than max_len={max_len}")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    scores: list[Score | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [(list(requests[i][0]) + list(requests[i][1]))[-(max_len + 1):] for i in batch]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        rows, cols, targets = [], [], []  # one entry per scored token: batch row, input position, target id
        for b, (i, seq) in enumerate(zip(batch, seqs)):
            ids[b, : len(seq) - 1] = torch.tensor(seq[:-1])
            n_cont = len(requests[i][1])
            # Input position p predicts token p + 1: the continuation's tokens are the last n_cont of seq.
            for p in range(len(seq) - 1 - n_cont, len(seq) - 1):
                rows.append(b)
                cols.append(p)
                targets.append(seq[p + 1])
        hidden = model.hidden_states(ids.to(device))  # [B, S, dim]
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # [N, dim]
        logp = torch.log_softmax(model.lm_head(picked).float(), dim=-1)
        tgt = torch.tensor(targets, device=device)
        token_logp = logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        greedy = (logp.argmax(dim=-1) == tgt).cpu()
        owner_t = torch.tensor(rows)
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, owner_t, token_logp)
        misses = torch.zeros(len(batch), dtype=torch.long).index_add_(0, owner_t, (~greedy).long())
        for b, i in enumerate(batch):
            scores[i] = Score(float(sums[b]), bool(misses[b] == 0), len(requests[i][1]))
    return scores  # type: ignore[return-value]
