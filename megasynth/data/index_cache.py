"""The on-disk caches of sample, pack and blend indices (.npz files written atomically, read defensively), and the
checks of the arguments those indices are built from.

A cache is an optimisation: an unreadable one (torn by a crash in an older version, a different numpy, a
truncated copy) is reported as a warning and rebuilt, never trusted and never fatal.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from megasynth.io import atomic_open


def index_key(header: str, documents: np.ndarray, lengths: np.ndarray) -> str:
    """32 hex digits of sha256 over `header`, then the selected document ids and their lengths (int64 LE)."""
    h = hashlib.sha256(header.encode())
    h.update(documents.astype("<i8").tobytes())
    h.update(np.asarray(lengths).astype("<i8").tobytes())
    return h.hexdigest()[:32]


def load_npz(path: Path, keys: Sequence[str], what: str) -> dict[str, np.ndarray] | None:
    """The named arrays of a cache file, or None (with a warning naming the file) when it is absent or
    unreadable. `what` names the cache in the warning ("sample-index", "pack-index", ...)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        warnings.warn(f"{path}: unreadable {what} cache ({e}); rebuilding it", stacklevel=3)
        return None


def cached_index(path: Path | None, keys: Sequence[str], what: str, fits, build, describe, *,
                 mismatch: str = "wrong shapes") -> tuple[dict[str, np.ndarray], bool]:
    """(the index arrays, whether they came from the cache): the file at `path` when it is readable and
    fits(arrays), else build() (then saved at `path` with describe() as its "description", through
    megasynth.io.atomic_open: readers see the old file or the whole new one). No cache when path is None.
    `mismatch` words the warning about a file that does not fit."""
    index = load_npz(path, keys, what) if path is not None else None
    if index is not None and not fits(index):
        warnings.warn(f"{path}: {what} cache has {mismatch}; rebuilding it", stacklevel=3)
        index = None
    if index is not None:
        return index, True
    index = build()
    if path is not None:
        with atomic_open(path, "wb") as f:
            np.savez(f, **index, description=np.array(describe()))
    return index, False


def check_sample_args(owner: str, seq_len, num_samples, seed, error: type[ValueError] = ValueError) -> None:
    """seq_len and num_samples must be integers >= 1, seed an integer >= 0; the error names `owner`."""
    for field, value, low in (("seq_len", seq_len, 1), ("num_samples", num_samples, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise error(f"{owner}: {field} must be an integer >= {low}, got {value!r}")
