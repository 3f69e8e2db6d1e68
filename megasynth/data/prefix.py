"""The files of a prefix, the checks before writing one, and the publish protocol that puts a new one in place
(`.idx` renamed last: the commit point). The steps and guarantees: docs/format.md ("Publishing a prefix");
tests/data/test_publish.py kills a writer at each step.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from megasynth.cli import overlap_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.faults import fault_point
from megasynth.io import fsync_dir, temp_path_beside

# The order in which publish_prefix touches the destination; each name is also a fault point (megasynth.faults).
PUBLISH_STEPS = ("temps-written", "old-idx-removed", "bin-renamed", "json-renamed", "mask-renamed", "idx-renamed")
FAULT_ENV = "MEGASYNTH_FAULT_PUBLISH_KILL_AFTER"


class IndexedDatasetError(ValueError):
    """A prefix is missing, truncated, corrupt or inconsistent; the message names the file and what is wrong."""


class PrefixOutputError(ValueError):
    """An output prefix that must not be written as asked; the message is one line naming the prefix."""


class OutputExistsError(PrefixOutputError):
    """The output prefix already exists and overwriting was not asked for."""


class EmptyOutputError(PrefixOutputError):
    """The output would hold no documents and an empty prefix was not asked for."""


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.json")


def mask_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.mask")


def max_id_cache_path(prefix: str | os.PathLike) -> Path:
    """Where the largest token id of a prefix without one in its sidecar is cached when no cache_dir is given."""
    return Path(f"{os.fspath(prefix)}.max_token_id.json")


def prefix_exists(prefix: str | os.PathLike) -> bool:
    """True when both PREFIX.bin and PREFIX.idx exist (it says nothing about whether they are valid)."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def check_output_free(prefix: str | os.PathLike, *, overwrite: bool) -> None:
    """Raise OutputExistsError when any file of the prefix exists and `overwrite` is false."""
    found = [p for p in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix), mask_path(prefix)) if p.exists()]
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise OutputExistsError(f"{os.fspath(prefix)}: the output prefix exists ({names}); pass --overwrite to "
                                "replace it")


def check_output_prefix(prefix: str | os.PathLike, inputs: dict, *, overwrite: bool, error: type[Exception]) -> None:
    """`error` unless the output prefix is no directory and does not overlap `inputs` (megasynth.cli's one overlap
    rule: {flag: path spec}); then check_output_free."""
    prefix = os.fspath(prefix)
    if Path(prefix).is_dir():
        raise error(f"{prefix}: is a directory; --output-prefix names files PREFIX.bin/.idx/.json")
    refusal = overlap_refusal({"": prefix_spec(prefix)}, inputs)
    if refusal:
        raise error(refusal)
    check_output_free(prefix, overwrite=overwrite)


def check_not_empty(prefix: str | os.PathLike, num_documents: int, *, allow_empty: bool) -> None:
    """Raise EmptyOutputError when the output would hold no documents and `allow_empty` is false."""
    if num_documents == 0 and not allow_empty:
        raise EmptyOutputError(f"{os.fspath(prefix)}: the output would hold no documents; pass --allow-empty to "
                               "write an empty prefix")


def temp_paths(prefix: str | os.PathLike, kinds) -> dict[str, Path]:
    """Temp names beside each destination file, sharing one PID-HEX token (so one write's leftovers group)."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # temp_path_beside's own default form, shared by all kinds
    return {kind: temp_path_beside(f"{os.fspath(prefix)}.{kind}", token) for kind in kinds}


def publish_prefix(prefix: str | os.PathLike, temps: dict[str, Path]) -> None:
    """Move finished temp files (kinds "bin", "idx", "json", optionally "mask") into place, .idx last.

    Every temp must already be complete and fsynced. The order and why: docs/format.md.
    """
    for kind in ("bin", "idx", "json"):
        if kind not in temps:
            raise ValueError(f"publish_prefix: no temp file for .{kind}")
    directory = idx_path(prefix).parent
    fault_point(FAULT_ENV, "temps-written")
    idx_path(prefix).unlink(missing_ok=True)
    if "mask" not in temps:  # an old mask would be stale beside the new tokens
        mask_path(prefix).unlink(missing_ok=True)
    # A cached largest id of the old files is keyed by their checksum, so it would be ignored; remove the clutter.
    max_id_cache_path(prefix).unlink(missing_ok=True)
    fsync_dir(directory)  # the removal is durable before any new file appears under its final name
    fault_point(FAULT_ENV, "old-idx-removed")
    os.replace(temps["bin"], bin_path(prefix))
    fault_point(FAULT_ENV, "bin-renamed")
    os.replace(temps["json"], sidecar_path(prefix))
    fault_point(FAULT_ENV, "json-renamed")
    if "mask" in temps:
        os.replace(temps["mask"], mask_path(prefix))
        fault_point(FAULT_ENV, "mask-renamed")
    fsync_dir(directory)  # .bin, .json and .mask are durable before the commit point can be
    os.replace(temps["idx"], idx_path(prefix))
    fault_point(FAULT_ENV, "idx-renamed")
    fsync_dir(directory)
