"""Checksums of a checkpoint's files: recorded in meta.json when it is saved, checked before it is loaded.

    files = checksum_files(step_dir, names)     # {name: {"bytes": N, "xxh3_64": HEX}}, at save time
    problems = find_problems(step_dir, files)   # ["__0_0.distcp: 4096 bytes, expected 8192 (truncated)", ...]

Under torch.distributed every rank must call both together (docs/training.md, "Checksums").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from megasynth.distributed import all_gather_object, rank_and_world

ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20  # bytes per read: large enough to run at disk/memory speed, small enough to stay in cache


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit the model; the message names the path."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files disagree with the checksums in its meta.json (or are missing)."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        super().__init__(f"{path}: damaged checkpoint: {problems[0]}{more}")


def file_checksum(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, xxh3_64 hex digest) of one file, streamed."""
    import xxhash  # noqa: PLC0415 (only checkpoint saving and loading need it)

    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _on_ranks(names: list[str], fn: Callable[[str], object]) -> dict[str, object]:
    """{name: fn(name)} for every name, each rank computing a round-robin share; fn must not raise."""
    rank, world = rank_and_world()
    shares = all_gather_object({name: fn(name) for name in sorted(names)[rank::world]})
    return {name: share[name] for share in shares for name in share}


def checksum_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes": N, "xxh3_64": HEX}} for the named files of `directory` (all ranks call it together).
    Raises OSError (naming the file) if one cannot be read, on every rank alike."""

    def one(name: str) -> dict:
        try:
            size, digest = file_checksum(directory / name)
        except OSError as e:
            return {"error": f"{directory / name}: cannot read it to checksum ({e.strerror or e})"}
        return {"bytes": size, ALGORITHM: digest}

    sums = _on_ranks(names, one)
    errors = [s["error"] for s in sums.values() if "error" in s]
    if errors:
        raise OSError(errors[0])
    return sums


def find_problems(directory: Path, files: dict[str, dict]) -> list[str]:
    """What is wrong with `directory` against its manifest `files` (empty: intact). Every rank calls it
    together; each file is checked for presence and size first (cheap), then its checksum."""

    def check(name: str) -> str | None:
        expected = files[name]
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name}: missing"
        except OSError as e:
            return f"{name}: cannot stat ({e.strerror or e})"
        if size != expected.get("bytes"):
            what = "truncated" if size < expected.get("bytes", 0) else "longer than saved"
            return f"{name}: {size} bytes, expected {expected.get('bytes')} ({what})"
        if ALGORITHM not in expected:
            return f"{name}: meta.json records no {ALGORITHM} checksum (found keys {sorted(expected)})"
        try:
            _, digest = file_checksum(path)
        except OSError as e:
            return f"{name}: cannot read ({e.strerror or e})"
        if digest != expected[ALGORITHM]:
            return f"{name}: checksum mismatch ({ALGORITHM} {digest}, saved {expected[ALGORITHM]}): the bytes changed"
        return None

    results = _on_ranks(list(files), check)
    return [problem for _, problem in sorted(results.items()) if problem]
