"""Small real inputs for the SBP stage tests: a byte-level BPE with <|sep|>, a corpus prefix, a tiny synthesizer.

    tok = make_tokenizer(tmp_path / "tok")                     # vocab 320, <|endoftext|> = EOD, <|sep|> one token
    corpus = make_corpus(tmp_path / "data" / "real", tok)      # CORPUS_TEXTS, one document each (+ EOD)
    run = make_synthesizer(tmp_path / "run", tok, corpus)      # a random tiny model saved as RUN/checkpoints/...

The synthesizer is untrained but shaped so that sampling exercises every path: its residual stream carries a
constant direction that the output row of EOD reads, so EOD comes with probability ~eod_share at every step
(empty outputs, short documents, and some that run to max_new_tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from helpers import tiny_config

from megasynth.chat import TRAINING_SPECIAL_TOKENS
from megasynth.checkpoint import save_model_checkpoint, step_dir_name
from megasynth.data.preprocess import preprocess
from megasynth.model import build_model
from megasynth.tokenizer import Tokenizer, train_bpe_tokenizer

CORPUS_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A list keeps its items in order; a set keeps each item once.",
    "def add(a, b):\n    return a + b\n",
    "Dictionaries map keys to values, and keys must be hashable.",
    "The json module reads and writes JSON text.",
    "Tuples are immutable sequences, often used for records.",
    "A generator yields values lazily, one at a time.",
    "Exceptions propagate up the call stack until something handles them.",
    "The os module talks to the operating system: files, paths, processes.",
    "Strings are sequences of Unicode code points.",
    "A class bundles data and the functions that act on it.",
    "Iterators remember where they are in a sequence.",
]


def make_tokenizer(directory: str | os.PathLike, *, separator: bool = True) -> Tokenizer:
    """A byte-level BPE trained on CORPUS_TEXTS; with separator, <|sep|> (and the chat tokens) are single tokens."""
    specials = TRAINING_SPECIAL_TOKENS if separator else ()
    return train_bpe_tokenizer(CORPUS_TEXTS * 4, directory, vocab_size=320, special_tokens=specials)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_corpus(prefix: str | os.PathLike, tok: Tokenizer, texts: list[str] | None = None) -> str:
    """texts (default CORPUS_TEXTS) tokenized with tok into PREFIX, one document each, EOD appended."""
    prefix = os.fspath(prefix)
    src = write_jsonl(Path(f"{prefix}.src.jsonl"), [{"text": t} for t in (texts or CORPUS_TEXTS)])
    preprocess([src], prefix, tok.path, workers=0, progress=False)
    return prefix


def make_synthesizer(run_dir: str | os.PathLike, tok: Tokenizer, corpus: str, *, eod_share: float = 0.15,
                     max_seq_len: int = 48, seed: int = 0) -> Path:
    """A tiny random model (tests/helpers.py's shape, tok's vocabulary) saved as a checkpoint with its tokenizer."""
    run_dir = Path(run_dir)
    cfg = tiny_config(run_dir, corpus, **{"model.vocab_size": tok.vocab_size, "model.max_seq_len": max_seq_len,
                                          "model.tie_embeddings": False})
    model = build_model(cfg.model, "cpu", seed=seed)
    with torch.no_grad():
        # Every token's embedding gets a large component on dim 0, so the normed hidden state h has h[0] ~ sqrt(dim)
        # whatever the input; the EOD row of the head reads it, giving EOD a fixed share of the probability.
        model.embed_tokens.weight[:, 0] = 4.0
        h0 = cfg.model.dim ** 0.5
        target = torch.log(torch.tensor(eod_share * (tok.vocab_size - 1) / (1 - eod_share)))
        model.lm_head.weight[tok.eod_id].zero_()
        model.lm_head.weight[tok.eod_id, 0] = float(target) / h0
    save_model_checkpoint(model, cfg, run_dir / "checkpoints" / step_dir_name(0))
    tok.save(run_dir / "tokenizer")
    return run_dir
