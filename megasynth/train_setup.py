"""The checks and preparation of a run directory before the first step (megasynth.train's setup).

Every problem found here is a SetupError: one line, exit code 2, before any training step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from megasynth import checkpoint
from megasynth.config import Config, load_config
from megasynth.data.loader import data_sources
from megasynth.distributed import DistInfo, on_rank0
from megasynth.io import atomic_dir, fsync_dir
from megasynth.run_lock import RunDirBusy, RunLock, acquire_run_lock
from megasynth.tokenizer import load_tokenizer


class SetupError(ValueError):
    """A problem with the run's inputs found before training starts (printed as one line, exit code 2)."""


def copy_tokenizer(first_prefix: str, run_dir: Path) -> dict | None:
    """Copy the tokenizer named by the first source's sidecar into RUN_DIR/tokenizer; return its identity."""
    sidecar = Path(f"{first_prefix}.json")
    try:
        tok = json.loads(sidecar.read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(tok, dict):
        return None
    try:
        tokenizer = load_tokenizer(tok["path"])
        with atomic_dir(run_dir / "tokenizer", replace=True) as tmp:  # complete before it takes the final name
            tokenizer.save(tmp)
        return tokenizer.identity()
    except Exception as e:  # the run does not need the tokenizer; tools that sample from it will say so
        print(f"warning: could not copy the tokenizer named in {sidecar} ({e}); RUN_DIR/tokenizer is absent",
              file=sys.stderr)
        return tok


def lock_run_dir(run_dir: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock (see megasynth/run_lock.py) and tells every rank whether it got
    it, so that all ranks stop together (SetupError, the same message) instead of waiting for rank 0 in a
    collective. Returns the lock on rank 0, None elsewhere."""
    return on_rank0(lambda: acquire_run_lock(run_dir), main=info.is_main, distributed=info.world_size > 1,
                    error_type=SetupError, catch=(RunDirBusy, OSError), convert=True)


def check_vocabulary(cfg: Config, cache_dir: Path) -> None:
    """Refuse data or a tokenizer that does not fit model.vocab_size, naming the prefix, the id and the key.
    A prefix whose sidecar does not record its largest id (Megatron's files) is scanned once; the result is
    cached in `cache_dir` beside the sample indices."""
    from megasynth.data.indexed import IndexedDataset  # noqa: PLC0415
    from megasynth.data.layout import is_count, vocab_sizes  # noqa: PLC0415

    vocab = cfg.model.vocab_size
    prefixes = [s.path for s in data_sources(cfg.data)] + list(cfg.data.valid_paths)
    for i, prefix in enumerate(prefixes):
        ds = IndexedDataset(prefix, cache_dir=cache_dir)
        sizes = dict(vocab_sizes(ds.metadata)) if i == 0 else {}  # the tokenizer's own size first
        tok_vocab = sizes.get("tokenizer.vocab_size", sizes.get("vocab_size"))
        if is_count(tok_vocab) and tok_vocab > vocab:
            raise SetupError(f"{prefix}: its tokenizer has {tok_vocab} ids (sidecar {prefix}.json) but "
                             f"model.vocab_size={vocab}; set --model.vocab_size={tok_vocab} (or more)")
        top = ds.max_token_id  # -1 for an empty prefix
        if top >= vocab:
            raise SetupError(f"{prefix}: its largest token id is {top} but model.vocab_size={vocab} (ids must be "
                             f"below it); set --model.vocab_size={top + 1} (or more), or re-tokenize the data")


def find_resume_checkpoint(cfg: Config, checkpoints_dir: Path, say=print) -> Path | None:
    """The verified checkpoint to resume from, or None. 'auto' passes over damaged checkpoints (saying so
    through `say`) to the newest intact one; an explicit path is verified and never falls back; 'none' starts
    over (`set_aside_earlier_run` has moved an earlier run's checkpoints out of the way first)."""
    resume = cfg.train.resume
    if resume == "auto":
        return checkpoint.find_latest_intact(checkpoints_dir, say=say)
    if resume == "none":
        existing = checkpoint.find_latest(checkpoints_dir)
        if existing is not None:  # only when set_aside_earlier_run was skipped: never mix two runs
            raise SetupError(f"train.resume='none' but {checkpoints_dir} holds checkpoints of an earlier run (newest "
                             f"{existing.name}); use --train.resume=auto to continue it, or another train.run_dir")
        return None
    return checkpoint.verify_checkpoint(resume)


# What an earlier run left in a run directory that a fresh run (train.resume='none') would mix with or replace.
EARLIER_RUN_FILES = ("checkpoints", "metrics.jsonl")


def set_aside_earlier_run(run_dir: Path, say=print) -> Path | None:
    """Starting over (train.resume='none') in a run directory that holds an earlier run's checkpoints or metrics:
    move them, whole, to RUN_DIR/earlier_runs/UTC-TIME/ and say so. Nothing is deleted: the user removes that
    folder when it is no longer wanted. Returns the folder, or None when there was nothing to move."""
    present = [name for name in EARLIER_RUN_FILES
               if (run_dir / name).is_file() or ((run_dir / name).is_dir() and any((run_dir / name).iterdir()))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir / "earlier_runs" / stamp
    n = 1
    while dest.exists():  # two restarts within a second
        dest, n = run_dir / "earlier_runs" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, dest / name)  # one filesystem: a rename, never a copy
    fsync_dir(run_dir)
    say(f"train.resume=none: moved the earlier run's {' and '.join(present)} to {dest} (delete it when no longer "
        f"needed); starting over")
    return dest


# How attention is computed, not what the model is: a run may resume on another machine with another kernel.
_IMPLEMENTATION_FIELDS = ("attention", "attention_core")


def check_same_model(ckpt: Path, cfg: Config) -> None:
    saved = load_config(ckpt / "config.toml").model
    diff = [f"model.{k}: {v!r} in the checkpoint, {getattr(cfg.model, k)!r} now"
            for k, v in asdict(saved).items() if getattr(cfg.model, k) != v and k not in _IMPLEMENTATION_FIELDS]
    if diff:
        raise SetupError(f"{ckpt}: the checkpoint's model differs from the configured one: " + "; ".join(diff))
