"""Perplexity of a model on an indexed-dataset prefix (PREFIX.bin/.idx), token-weighted (docs/eval.md, "Metrics").

    sums = perplexity_sums(model, IndexedDataset("data/valid"), seq_len=1024)       # {"nll", "tokens", "windows"}
    loss = sums["nll"] / sums["tokens"]; ppl = exp(loss)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from megasynth.data.indexed import IndexedDataset

# Rows of [rows, V] logits at once: bounds memory at large vocabularies.
_HEAD_CHUNK = 2048


def num_windows_of(num_tokens: int, seq_len: int) -> int:
    """Windows needed so that every token after the first is a label once."""
    return max(0, math.ceil((num_tokens - 1) / seq_len))


def window(ds: IndexedDataset, w: int, seq_len: int, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 [n], doc_ids int64 [n]) of window w; n = seq_len + 1 except possibly for the last window."""
    lo = w * seq_len
    hi = min(lo + seq_len + 1, ds.num_tokens)
    tokens = np.asarray(ds.tokens[lo:hi], dtype=np.int64)
    doc = np.searchsorted(doc_starts, np.arange(lo, hi), side="right") - 1
    return tokens, doc - doc[0]


@torch.no_grad()
def perplexity_sums(model, ds: IndexedDataset, *, seq_len: int, num_windows: int | None = None, batch_size: int = 8,
                    document_masking: bool = True, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """{"nll": summed token loss (nats), "tokens": predicted tokens, "windows": windows} over this rank's share."""
    total = num_windows_of(ds.num_tokens, seq_len)
    if total == 0:  # no token to predict: refuse rather than report exp(0 / 0) as a perfect perplexity of 1
        raise ValueError(f"{ds.prefix}: {ds.num_tokens} tokens; perplexity needs at least 2 (a token to predict "
                         "and one before it)")
    if num_windows is not None:
        if num_windows > total:
            raise ValueError(f"{ds.prefix}: {num_windows} windows of {seq_len + 1} tokens asked for, the prefix has "
                             f"{ds.num_tokens} tokens ({total} windows)")
        total = num_windows
    mine = list(range(rank, total, world_size))
    seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths.astype(np.int64))])
    doc_starts = seq_starts[ds.document_indices[:-1]]  # a document may span several sequences (Megatron files)
    device = model.embed_tokens.weight.device
    nll, count = 0.0, 0
    for start in range(0, len(mine), batch_size):
        windows = [window(ds, w, seq_len, doc_starts) for w in mine[start : start + batch_size]]
        width = max(len(t) for t, _ in windows) - 1
        ids = torch.zeros(len(windows), width, dtype=torch.long)
        labels = torch.full((len(windows), width), -100, dtype=torch.long)
        docs = torch.zeros(len(windows), width, dtype=torch.long)
        for b, (tokens, doc) in enumerate(windows):
            n = len(tokens) - 1
            ids[b, :n] = torch.from_numpy(tokens[:-1])
            labels[b, :n] = torch.from_numpy(tokens[1:])
            docs[b, :n] = torch.from_numpy(doc[:-1])
            docs[b, n:] = int(doc[n - 1]) + 1  # padding is a document of its own, after the real tokens
        doc_ids = docs.to(device) if document_masking else None
        hidden = model.hidden_states(ids.to(device), doc_ids=doc_ids).flatten(0, 1)
        flat = labels.flatten().to(device)
        keep = flat != -100
        hidden, flat = hidden[keep], flat[keep]
        for c in range(0, len(flat), _HEAD_CHUNK):
            logits = model.lm_head(hidden[c : c + _HEAD_CHUNK]).float()
            nll += float(F.cross_entropy(logits, flat[c : c + _HEAD_CHUNK], reduction="sum"))
        count += int(keep.sum())
    return {"nll": nll, "tokens": float(count), "windows": float(len(mine))}


def perplexity_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Reduced sums -> {"loss", "ppl", "tokens", "windows"}."""
    if sums["tokens"] <= 0:
        raise ValueError("perplexity over no predicted tokens is undefined")
    loss = sums["nll"] / sums["tokens"]
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(sums["tokens"]), "windows": int(sums["windows"])}
