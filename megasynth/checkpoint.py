"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, resumable, reshardable, no code run.
Layout: docs/training.md ("Checkpoints"); the save protocol and guarantees: docs/format.md ("Checkpoints").
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
    set_state_dict)

from megasynth.checkpoint_verify import (ALGORITHM, CheckpointError, DamagedCheckpointError, checksum_files,
    file_checksum, find_problems)
from megasynth.config import Config, load_config, save_config
from megasynth.distributed import barrier, broadcast_object, is_distributed, rank_and_world
from megasynth.io import atomic_write_text, fsync_dir, remove_dir, remove_stale_temps, temp_path_beside
from megasynth.safe_unpickle import SafeFileSystemReader, UnsafePickleError, load_metadata

STEP_DIR = re.compile(r"^step_(\d{8})$")
LEGACY_TEMP = re.compile(r"^step_\d{8}\.tmp-")  # temp directories named by saves before megasynth.io's naming
JSON_PARTS = ("scheduler", "data", "rng", "progress")
METADATA = ".metadata"  # DCP's metadata file


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, file too large, ...); its temp directory is gone, earlier checkpoints intact."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _read_meta_or_none(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(path: Path) -> bool:
    return (_read_meta_or_none(path) or {}).get("complete") is True


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), child) for child in root.iterdir()
                  if (m := STEP_DIR.match(child.name)) and child.is_dir())


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first; temp directories and incomplete ones are ignored.
    Complete means meta.json says so; whether the files are intact is `verify_checkpoint`'s question."""
    return [(step, path) for step, path in _step_dirs(Path(checkpoints_dir)) if _is_complete(path)]


def find_latest(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir`, or None (not verified: see find_latest_intact)."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a step directory, a checkpoints directory or a run directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        if _read_meta_or_none(path) is None:
            raise DamagedCheckpointError(path, ["meta.json: not a JSON object (unreadable or damaged)"])
        if not _is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (meta.json lacks \"complete\": true)")
        return path
    latest = find_latest(path / "checkpoints") or find_latest(path)
    if latest is not None:
        return latest
    raise CheckpointError(f"{path}: no complete checkpoint here (expected a step_XXXXXXXX directory with meta.json, "
                          "a checkpoints/ directory or a run directory)")


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


# ----------------------------------------------------------------------------------------------- verification


def _to_stderr(message: str) -> None:
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Check every file listed in meta.json (presence, size, xxh3_64) and that .metadata exists; return the
    path, or raise DamagedCheckpointError naming the first bad file. A checkpoint saved before checksums were
    recorded is accepted with a warning. Under torch.distributed every rank must call this together."""
    path = resolve_checkpoint(path)
    files = read_meta(path).get("files")
    if not isinstance(files, dict):
        _to_stderr(f"warning: {path}: meta.json records no checksums (saved by an older megasynth); loading it unverified")
        files = {}
    problems = find_problems(path, files)
    if METADATA not in files and not (path / METADATA).is_file():
        problems.append(f"{METADATA}: missing")
    if problems:
        raise DamagedCheckpointError(path, problems)
    return path


def find_latest_intact(checkpoints_dir: str | os.PathLike, say: Callable[[str], None] = _to_stderr) -> Path | None:
    """The newest checkpoint under `checkpoints_dir` that passes `verify_checkpoint`, or None if there is no
    checkpoint at all. Each damaged one passed over is reported through `say` (one line naming the file), and
    so is the fallback. Raises CheckpointError when checkpoints exist but none is intact."""
    root = Path(checkpoints_dir)
    skipped: list[Path] = []
    for _, path in reversed(_step_dirs(root)):
        if _read_meta_or_none(path) is None and (path / "meta.json").exists():
            say(f"warning: {path}: damaged checkpoint: meta.json is not readable JSON; skipping it")
            skipped.append(path)
            continue
        if not _is_complete(path):
            continue  # not a checkpoint (no meta.json, or not marked complete)
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as e:
            say(f"warning: {e}; skipping it")
            skipped.append(path)
            continue
        if skipped:
            say(f"warning: falling back to {path}, the newest intact checkpoint (skipped damaged: "
                f"{', '.join(p.name for p in skipped)})")
        return path
    if skipped:
        raise CheckpointError(f"{root}: every checkpoint is damaged ({', '.join(p.name for p in skipped)}); "
                              "move them away to start fresh")
    return None


def _read_dcp_metadata(path: Path):
    """.metadata through the restricted unpickler, every failure a CheckpointError naming the file."""
    try:
        return load_metadata(path / METADATA)
    except UnsafePickleError as e:
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise DamagedCheckpointError(path, [f"{METADATA}: missing"]) from None
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DamagedCheckpointError(path, [f"{METADATA}: unreadable ({type(e).__name__}: {e})"]) from None


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


def _rank() -> int:
    return rank_and_world()[0]


def _dcp(op: Callable, state: dict, path: Path, **kwargs) -> None:
    """dcp.save or dcp.load, in a single process too."""
    with warnings.catch_warnings():
        # A single process without a process group is a supported case, not worth a warning per save.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        op(state, checkpoint_id=path, no_dist=not is_distributed(), **kwargs)


def _dcp_load(state: dict, path: Path, into: str) -> None:
    """dcp.load through the restricted readers; any failure is a CheckpointError naming `path` and `into`."""
    try:
        _dcp(dcp.load, state, path, storage_reader=SafeFileSystemReader(path), planner=_WeightsOnlyLoadPlanner())
    # DCP wraps each rank's error (missing key, shape mismatch) in a CheckpointException, a BaseException.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot load {into}: {_error_line(e)}") from e


# ----------------------------------------------------------------------------------------------- saving


def _write_run_files(tmp: Path, cfg: Config, meta: dict, files: dict) -> None:
    """config.toml, then meta.json (with every file's checksum, marked complete) into the temp directory."""
    save_config(cfg, tmp / "config.toml")
    size, digest = file_checksum(tmp / "config.toml")  # rank 0 alone: not checksum_files, a collective
    files = {**files, "config.toml": {"bytes": size, ALGORITHM: digest}}
    record = {**meta, "checksum": ALGORITHM, "files": dict(sorted(files.items())), "complete": True}
    atomic_write_text(tmp / "meta.json", json.dumps(record, indent=2) + "\n")


def _state_bytes(state: dict) -> int:
    """Bytes DCP writes for `state` (global tensor sizes, so the same on every rank), ignoring small extras."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _state_bytes(value)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()  # a DTensor's numel is the global one
        elif isinstance(value, str):
            total += len(value.encode())
    return total


def _root_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed save: DCP wraps each rank's exception in a CheckpointException."""
    seen = set()
    todo = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return cur
        if isinstance(cur, CheckpointException):
            todo.extend(exc for exc, _tb in cur.failures.values())
        todo.extend([cur.__cause__, cur.__context__])
    return None


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _describe_failure(final: Path, error: BaseException, needed: int) -> str:
    """One line: which checkpoint, the OS error (and its file), the space needed against the space free."""
    cause = _root_os_error(error)
    if cause is None:
        return f"cannot save checkpoint {final}: {_error_line(error)}"
    where = f" ({cause.filename})" if cause.filename else ""
    try:
        free = f"{_mb(shutil.disk_usage(final.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    space = f"; it needs about {_mb(needed)}, {free}"
    if cause.errno == errno.EFBIG:
        space += " (a file size limit, e.g. ulimit -f, may be what was hit)"
    return f"cannot save checkpoint {final}: {cause.strerror or cause}{where}{space}; its temp directory was removed"


def _publish(state: dict, final: Path, cfg: Config, meta: dict) -> Path:
    """DCP-save `state` into a temp directory beside `final`, checksum its files, then (rank 0) add the run
    files and rename it to `final`. Every rank calls this; when the save fails (an OSError such as ENOSPC or
    EFBIG anywhere) every rank raises CheckpointSaveError with rank 0's one-line description, after rank 0
    removed the temp directory.

    (megasynth.io.atomic_dir is for one writer; here every rank writes shards into the directory, so the steps
    are spelled out, with rank 0's verdict broadcast after each step that can fail on rank 0 alone.)"""
    needed = _state_bytes(state)
    token = broadcast_object(f"{os.getpid()}-{uuid.uuid4().hex[:12]}")  # one temp directory shared by every rank
    tmp = temp_path_beside(final, token)
    failure: BaseException | None = None
    if _rank() == 0:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = e
    if not broadcast_object(failure is not None):
        try:
            _dcp(dcp.save, state, tmp)  # a failure on any rank raises a CheckpointException on every rank
            # Rank 0 lists the files (shards and .metadata, on the shared filesystem DCP requires) for all.
            names = broadcast_object(sorted(p.name for p in tmp.iterdir() if p.is_file()) if _rank() == 0 else [])
            files = checksum_files(tmp, names)  # every rank hashes a share; raises on every rank alike
            if _rank() == 0:
                _write_run_files(tmp, cfg, meta, files)
                if final.exists():  # the same step saved again (e.g. after falling back from a damaged one)
                    remove_dir(final)
                os.replace(tmp, final)
                fsync_dir(final.parent)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (described below, then re-raised)
            failure = e
    if _rank() == 0 and failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the free space reported is what is really free
    message = broadcast_object(_describe_failure(final, failure, needed) if failure is not None else "")
    if message:
        if failure is not None and _root_os_error(failure) is None:
            raise failure  # a bug rather than a full disk: keep its traceback
        raise CheckpointSaveError(message)
    barrier()
    return final


def remove_stale_saves(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Remove temp directories left in `checkpoints_dir` by crashed saves or prunes (megasynth.io's
    `.NAME.tmp-*` names and the older `step_XXXXXXXX.tmp-*` ones). Call it only while no save can be running
    (the trainer holds the run directory's lock)."""
    root = Path(checkpoints_dir)
    removed = remove_stale_temps(root)
    if root.is_dir():
        for child in root.iterdir():
            if LEGACY_TEMP.match(child.name) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


# ----------------------------------------------------------------------------------------------- training state


def save_checkpoint(checkpoints_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, parts: dict[str, dict], cfg: Config, meta: dict,
                    keep_last: int = 0) -> Path:
    """Save model, optimizer and the JSON `parts` (scheduler, data, rng, progress) as step_XXXXXXXX; prune.

    Every rank calls this. Returns the final directory, which exists (complete) when the call returns; raises
    CheckpointSaveError (one line, temp directory removed, nothing pruned) when the save fails.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, **{name: json.dumps(parts.get(name)) for name in JSON_PARTS}}
    final = _publish(state, Path(checkpoints_dir) / step_dir_name(step), cfg, {**meta, "step": step})
    if _rank() == 0:
        # Prune: keep the newest `keep_last` complete checkpoints (0 keeps all) and the one just saved (so the
        # newest verified one survives even when newer-numbered damaged ones exist); remove stale temp dirs.
        older = list_checkpoints(checkpoints_dir)[:-keep_last] if keep_last > 0 else []
        for _, path in older:
            if path != final:
                remove_dir(path)
        remove_stale_saves(checkpoints_dir)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    verify: bool = True) -> dict[str, dict | None]:
    """Load model and optimizer in place from a checkpoint; return its JSON parts {name: value or None}.
    The files are verified first unless the caller just did (`verify=False` after verify_checkpoint)."""
    path = verify_checkpoint(path) if verify else resolve_checkpoint(path)
    saved = set(_read_dcp_metadata(path).state_dict_metadata)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, **{name: "" for name in JSON_PARTS if name in saved}}
    _dcp_load(state, path, "into this model/optimizer")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {name: json.loads(state[name]) if name in state else None for name in JSON_PARTS}


def _error_line(e: BaseException) -> str:
    """The root error's own line ("ValueError: Size mismatch ..."), not DCP's wrapper and traceback."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------- weights only


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike, verify: bool = True) -> Path:
    """Load only the model weights of a (full or weights-only) checkpoint into `model`, in place; the files
    are verified first unless the caller just did."""
    path = verify_checkpoint(path) if verify else resolve_checkpoint(path)
    _read_dcp_metadata(path)  # refuses a .metadata that names anything but DCP metadata classes
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, path, "the weights into this model")
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
    from megasynth.model import build_model  # noqa: PLC0415

    path = verify_checkpoint(path)  # config.toml is among the verified files
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.toml beside the weights")
    cfg = load_config(config_path)
    model = build_model(cfg.model, device, seed=None)  # every weight is overwritten by the checkpoint
    load_model_weights(model, path, verify=False)
    return model.to(dtype=dtype).eval(), cfg
