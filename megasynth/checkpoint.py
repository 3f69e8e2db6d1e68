"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, reshardable, weights-only to read.

Layout of RUN_DIR/checkpoints/step_00000100/:
    *.distcp, .metadata   DCP shards of {"model", "optim", "scheduler", "data", "rng", "progress"}
    config.toml           the resolved Config of the run
    meta.json             {"step", "tokens", "flops", "blend_fingerprint", "tokenizer", "complete": true, ...}

"model" and "optim" come from `torch.distributed.checkpoint.state_dict.get_state_dict`, so FSDP2/TP DTensor
shards and plain modules save the same keys and a checkpoint written at one (dp, tp) shape loads at another.
"scheduler", "data", "rng" and "progress" are JSON strings: nothing in a checkpoint needs unpickling, and every
non-tensor value DCP stores is read back with `torch.load(..., weights_only=True)`.

A save writes into `step_XXXXXXXX.tmp-<id>/` and renames it to its final name only after every rank's shards,
config.toml and meta.json are on disk, so a checkpoint is visible under its final name only when complete; a
crash mid-save leaves a .tmp directory that `find_latest` never returns and the next save removes.

Other tools use:
    find_latest(checkpoints_dir) -> Path | None
    load_for_inference(path, device="cpu", dtype=torch.float32) -> (Transformer, Config)
    save_model_checkpoint(model, cfg, path, meta=None)       a weights-only checkpoint in the same layout
    load_model_weights(model, path)                          weights only (train.init_from)
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megasynth.config import Config, load_config, save_config

STEP_DIR = re.compile(r"^step_(\d{8})$")
JSON_PARTS = ("scheduler", "data", "rng", "progress")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first; .tmp directories and incomplete ones are ignored."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and _is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir`, or None."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        if not _is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (meta.json lacks \"complete\": true)")
        return path
    for root in (path / "checkpoints", path):
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: no complete checkpoint here (expected a step_XXXXXXXX directory with meta.json, "
                          "a checkpoints/ directory or a run directory)")


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor values with weights_only=False; ours never runs pickled code."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ----------------------------------------------------------------------------------------------- helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _broadcast_str(text: str) -> str:
    if not _distributed():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _dcp_save(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        # A single process without a process group is a supported case, not worth a warning per save.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path, no_dist=not _distributed())


def _dcp_load(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner(), no_dist=not _distributed())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """Delete a directory so that it never looks like a complete checkpoint halfway through."""
    doomed = path.with_name(f"{path.name}.tmp-deleting-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_run_files(tmp: Path, cfg: Config | None, meta: dict) -> None:
    """config.toml, then meta.json (marked complete) into the not-yet-visible checkpoint directory."""
    if cfg is not None:
        save_config(cfg, tmp / "config.toml")
    _atomic_write_text(tmp / "meta.json", json.dumps({**meta, "complete": True}, indent=2) + "\n")


def _publish(state: dict, final: Path, cfg: Config | None, meta: dict) -> Path:
    """DCP-save `state` into a temp directory beside `final`, then (rank 0) add the run files and rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    token = _broadcast_str(uuid.uuid4().hex[:12])  # one temp directory shared by every rank
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    _dcp_save(state, tmp)
    _barrier()  # every rank's shards are written
    if _rank() == 0:
        _write_run_files(tmp, cfg, meta)
        if final.exists():  # the same step saved again (e.g. an overwritten run): replace it
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    _barrier()
    return final


# ----------------------------------------------------------------------------------------------- RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's Python, numpy, torch CPU and CUDA generator states, as JSON-safe values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def gather_rng_states() -> dict[str, dict]:
    """{"rank_R": rng_state()} for every rank (identical on every rank, so DCP stores it once)."""
    mine = rng_state()
    if not _distributed():
        return {"rank_0": mine}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return {f"rank_{r}": s for r, s in enumerate(states)}


# ----------------------------------------------------------------------------------------------- training state


def save_checkpoint(checkpoints_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, parts: dict[str, dict], cfg: Config, meta: dict,
                    keep_last: int = 0) -> Path:
    """Save model, optimizer and the JSON `parts` (scheduler, data, rng, progress) as step_XXXXXXXX; prune.

    Every rank calls this. Returns the final directory, which exists (complete) when the call returns.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for name in JSON_PARTS:
        state[name] = json.dumps(parts.get(name))
    final = _publish(state, Path(checkpoints_dir) / step_dir_name(step), cfg, {**meta, "step": step})
    if _rank() == 0:
        prune_checkpoints(checkpoints_dir, keep_last)
    _barrier()
    return final


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints (0 keeps all); remove stale .tmp directories."""
    root = Path(checkpoints_dir)
    removed = []
    complete = list_checkpoints(root)
    if keep_last > 0:
        for _, path in complete[:-keep_last]:
            _remove_dir(path)
            removed.append(path)
    for child in root.iterdir():
        if ".tmp-" in child.name and child.is_dir():  # left by a crashed save (or a crashed prune)
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, dict | None]:
    """Load model and optimizer in place from a checkpoint; return its JSON parts {name: value or None}."""
    path = resolve_checkpoint(path)
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict = {"model": model_sd, "optim": optim_sd}
    for name in JSON_PARTS:
        if name in saved:
            state[name] = ""
    try:
        _dcp_load(state, path)
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot load into this model/optimizer: {_error_line(e)}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {name: json.loads(state[name]) if name in state else None for name in JSON_PARTS}


# DCP wraps each rank's error (missing key, shape mismatch) in a CheckpointException, a BaseException.
_LOAD_ERRORS = (Exception, CheckpointException)


def _error_line(e: BaseException) -> str:
    """The root error's own line ("ValueError: Size mismatch ..."), not DCP's wrapper and traceback."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------- weights only


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Load only the model weights of a (full or weights-only) checkpoint into `model`, in place."""
    path = resolve_checkpoint(path)
    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    try:
        _dcp_load(state, path)
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot load the weights into this model: {_error_line(e)}") from e
    set_model_state_dict(model, state["model"])
    return path


def save_model_checkpoint(model: torch.nn.Module, cfg: Config, path: str | os.PathLike,
                          meta: dict | None = None) -> Path:
    """Write the model's weights as a checkpoint directory `path` (same layout, no optimizer), atomically."""
    meta = {"step": 0, "tokens": 0, "flops": 0.0, "blend_fingerprint": None, "tokenizer": None, **(meta or {}),
            "weights_only": True}
    return _publish({"model": get_model_state_dict(model)}, Path(path), cfg, meta)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """(Transformer in eval mode on `device` in `dtype`, Config) from a step directory or a run directory."""
    from megasynth.model import Transformer  # noqa: PLC0415

    path = resolve_checkpoint(path)
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.toml beside the weights")
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties them; every weight is then overwritten by the checkpoint
    load_model_weights(model, path)
    return model.to(dtype=dtype).eval(), cfg
