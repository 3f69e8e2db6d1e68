"""Constants and small rules of the indexed format shared by its writer and reader: the .idx header, the dtype
codes, the sidecar's schema version and computed keys, and where a sidecar records the vocabulary size.
The format itself is described in docs/format.md; the writer is megasynth/data/indexed_writer.py, the reader
megasynth/data/indexed.py."""

from __future__ import annotations

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic (9) + version <Q (8) + dtype code <B (1) + sequence count <Q (8) + document count <Q (8)
HEADER_SIZE = 34
SIDECAR_FORMAT = "megasynth-indexed"
# 2 added max_token_id, files (the .idx sha256, the .bin size) and loss_mask; format 1 sidecars still open.
SIDECAR_VERSION = 2
SIDECAR_VERSIONS_READ = (1, 2)
# Keys the writer computes itself; a caller's metadata may not set them.
RESERVED_SIDECAR_KEYS = ("format", "format_version", "tool_version", "dtype", "num_documents", "num_tokens",
                         "max_token_id", "files", "loss_mask")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def smallest_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id in [0, vocab_size) fits (vocab_size <= 65536), else int32 (Megatron's choice)."""
    if not is_count(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > 2**31:
        raise ValueError(f"vocab_size {vocab_size} does not fit the format's largest id type int32")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def token_dtype(dtype) -> np.dtype:
    """dtype as a numpy dtype the format has a code for (native byte order); ValueError otherwise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"not a numpy dtype: {dtype!r}") from e
    dt = dt.newbyteorder("=") if dt.byteorder == ">" else dt
    if dt not in CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} has no code in the indexed format; expected one of {names}")
    return dt


def vocab_sizes(meta: dict | None) -> list[tuple[str, object]]:
    """(field, value) for each place a sidecar (or writer metadata) states the vocabulary size: the top-level
    `vocab_size` and the tokenizer identity's `tokenizer.vocab_size`. Values are returned as found."""
    meta = meta or {}
    found = []
    if meta.get("vocab_size") is not None:
        found.append(("vocab_size", meta["vocab_size"]))
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("vocab_size") is not None:
        found.append(("tokenizer.vocab_size", tok["vocab_size"]))
    return found


def is_count(value) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def tokenizer_hash(meta: dict | None) -> str | None:
    """The tokenizer identity's hash a sidecar records (its sha256, or an older "hash"), or None."""
    tok = (meta or {}).get("tokenizer")
    return (tok.get("sha256") or tok.get("hash")) if isinstance(tok, dict) else None
