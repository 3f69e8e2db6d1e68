"""The on-disk caches of sample, pack and blend indices: .npz files written atomically, read defensively.

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


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez through megasynth.io.atomic_open: readers see the old file or the whole new one."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


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
