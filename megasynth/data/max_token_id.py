"""The largest token id of a prefix whose sidecar does not record it (Megatron's files, sidecars of format 1):
computed once over the memory-mapped .bin in blocks and cached (docs/format.md, "Largest token id";
bench/vocab_check.py measures the scan).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megasynth.data.layout import is_count
from megasynth.data.prefix import max_id_cache_path
from megasynth.io import atomic_write_json

CACHE_FORMAT = "megasynth-max-token-id"
# Tokens per np.max call: large enough that per-call overhead vanishes, small enough (64 MiB of int32) that
# the scan's memory stays bounded whatever the prefix's size.
BLOCK_TOKENS = 1 << 24


def max_of_tokens(tokens: np.ndarray, block: int = BLOCK_TOKENS) -> int:
    """Largest value of a 1-D integer array, read block by block; -1 for an empty array."""
    best = -1
    for start in range(0, tokens.size, block):
        best = max(best, int(tokens[start : start + block].max()))
    return best


def cached_max_token_id(prefix: str | os.PathLike, tokens: np.ndarray, *, idx_sha256: str, bin_path: Path,
                        cache_dir: str | os.PathLike | None = None) -> tuple[int, bool]:
    """(largest id, whether it came from the cache). An unreadable or mismatched cache file is recomputed and
    replaced; a cache that cannot be written is skipped."""
    st = bin_path.stat()
    key = {"format": CACHE_FORMAT, "idx_sha256": idx_sha256, "bin_size": st.st_size,
           "bin_mtime_ns": st.st_mtime_ns, "dtype": tokens.dtype.name}
    path = (Path(cache_dir) / f"max_token_id_{idx_sha256[:32]}.json" if cache_dir is not None
            else max_id_cache_path(prefix))
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key:
        value = cached.get("max_token_id")
        if is_count(value) and -1 <= value <= np.iinfo(tokens.dtype).max and (value == -1) == (tokens.size == 0):
            return value, True
    value = max_of_tokens(tokens)
    try:
        atomic_write_json(path, {**key, "max_token_id": value})
    except OSError:
        pass  # read-only dataset directory or cache: computing again next time is the price, not an error
    return value, False
