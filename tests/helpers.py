"""Shared test fixtures: a tiny tokenised corpus on disk and a small Config that trains on it in seconds.

    prefix = write_pattern_corpus(tmp_path / "data" / "train")         # PREFIX.bin/.idx/.json, vocab 64
    cfg = tiny_config(tmp_path / "run", prefix, **{"train.steps": 30})
    save_config(cfg, tmp_path / "cfg.toml")    # then: python -m megasynth.train --config tmp_path/cfg.toml

The corpus needs no tokenizer: each document repeats one of a few random token patterns and ends with EOD,
so a model can memorise it (the next token is determined once the pattern is recognised) and a falling loss
is a real signal. Deterministic given the seed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from megasynth.config import Config, config_from_dict, config_to_dict
from megasynth.data.indexed import IndexedDatasetWriter, smallest_token_dtype

TINY_VOCAB = 64
EOD_ID = 0


def pattern_documents(*, vocab_size: int = TINY_VOCAB, num_docs: int = 48, num_patterns: int = 4,
                      pattern_len: int = 5, doc_len: int = 37, seed: int = 0) -> list[np.ndarray]:
    """Documents of doc_len tokens: one of num_patterns random patterns (ids 1..vocab-1) repeated, then EOD (0)."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(1, vocab_size, size=(num_patterns, pattern_len))
    docs = []
    for _ in range(num_docs):
        body = np.resize(patterns[rng.integers(num_patterns)], doc_len - 1)
        docs.append(np.append(body, EOD_ID).astype(np.int64))
    return docs


def write_pattern_corpus(prefix: str | os.PathLike, *, vocab_size: int = TINY_VOCAB, seed: int = 0,
                         **doc_kwargs) -> str:
    """Write pattern_documents(...) as an indexed prefix (with a sidecar naming vocab and EOD); return the prefix."""
    prefix = os.fspath(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    docs = pattern_documents(vocab_size=vocab_size, seed=seed, **doc_kwargs)
    with IndexedDatasetWriter(prefix, smallest_token_dtype(vocab_size),
                              metadata={"vocab_size": vocab_size, "eod_id": EOD_ID}) as writer:
        writer.add_documents(docs)
    return prefix


def tiny_config(run_dir: str | os.PathLike, data_prefix: str | os.PathLike, *,
                valid_prefix: str | os.PathLike | None = None, **overrides) -> Config:
    """A 2-layer, dim-32 model on seq 16, 8 sequences per step, CPU fp32; `overrides` use dotted keys."""
    table = {
        "model": {"vocab_size": TINY_VOCAB, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                  "ffn_dim": 64, "max_seq_len": 32, "rope_theta": 10000.0, "tie_embeddings": True},
        "data": {"data_path": os.fspath(data_prefix), "seq_len": 16,
                 "valid_paths": [os.fspath(valid_prefix)] if valid_prefix else []},
        "optim": {"lr": 1e-2, "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 20, "global_batch_size": 8, "micro_batch_size": 4, "device": "cpu", "dtype": "float32",
                  "run_dir": os.fspath(run_dir), "checkpoint_every": 0, "keep_last": 0, "eval_every": 0,
                  "eval_batches": 2, "log_every": 1, "seed": 1234},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        table[section][name] = value
    return config_from_dict(config_to_dict(config_from_dict(table)))


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """tools/NAME.py as a fresh module, so its main(argv) runs in-process (no interpreter start-up). It is
    registered in sys.modules because dataclasses defined in a tool look their module up there."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
