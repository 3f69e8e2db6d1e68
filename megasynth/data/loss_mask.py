"""The loss-mask file PREFIX.mask: one bit per token of the prefix's token stream (True = predict this token).
The writer streams (a carry of at most 7 bits between batches); the reader memory-maps the file and unpacks
only the bytes a window touches. Layout and why bits: docs/format.md ("The loss mask").
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from megasynth.data.prefix import IndexedDatasetError
from megasynth.io import file_sha256

MASK_MAGIC = b"MSLMASK\x00"
MASK_VERSION = 1
MASK_HEADER_SIZE = 24
MASK_ENCODING = "bits-le"  # the sidecar's loss_mask.encoding for this layout


class LossMaskError(IndexedDatasetError):
    """A loss-mask file that does not fit its prefix or sidecar; the message names the file."""


def mask_file_size(num_tokens: int) -> int:
    return MASK_HEADER_SIZE + (num_tokens + 7) // 8


def checked_mask(mask, num_tokens: int, what: str) -> np.ndarray:
    """mask as a 1-D bool array of num_tokens entries: bool dtype, or integers that are all 0 or 1."""
    m = np.asarray(mask)
    if m.ndim != 1 or m.size != num_tokens:
        raise ValueError(f"{what}: loss_mask must be a 1-D array of {num_tokens} entries (one per token), "
                            f"got shape {m.shape}")
    if m.dtype == np.bool_:
        return m
    if m.size == 0:
        return np.empty(0, dtype=np.bool_)
    if m.dtype.kind not in "iu" or int(m.min()) < 0 or int(m.max()) > 1:
        raise ValueError(f"{what}: loss_mask must be booleans (or integers 0/1), got dtype {m.dtype}"
                            + (f" with values in [{m.min()}, {m.max()}]" if m.dtype.kind in "iuf" else ""))
    return m.astype(np.bool_)


class LossMaskWriter:
    """Streams bits into a mask file: `add(mask)` per batch, `finish()` writes the header and returns the
    sidecar entry. The file is a temp file of the prefix writer; publishing it is the prefix writer's job."""

    def __init__(self, path: Path, final_name: str):
        self.path, self.final_name = path, final_name
        self._f = open(path, "wb", buffering=1 << 20)
        self._f.write(bytes(MASK_HEADER_SIZE))  # the header is written by finish(), when num_tokens is known
        self._carry = np.empty(0, dtype=np.bool_)  # the < 8 bits that do not fill a byte yet
        self.num_tokens = 0
        self.num_targets = 0

    def add(self, mask: np.ndarray) -> None:
        """Append a checked bool mask (see checked_mask)."""
        self.num_tokens += int(mask.size)
        self.num_targets += int(np.count_nonzero(mask))
        bits = np.concatenate([self._carry, mask]) if self._carry.size else mask
        whole = bits.size - bits.size % 8
        if whole:
            self._f.write(np.packbits(bits[:whole], bitorder="little").tobytes())
        self._carry = bits[whole:].copy()

    def finish(self) -> dict:
        """Write the last partial byte and the header, fsync, close; return the sidecar's loss_mask entry."""
        if self._carry.size:
            self._f.write(np.packbits(self._carry, bitorder="little").tobytes())  # pads with zero bits
        self._f.seek(0)
        self._f.write(MASK_MAGIC + struct.pack("<QQ", MASK_VERSION, self.num_tokens))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"file": self.final_name, "encoding": MASK_ENCODING, "size": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "num_targets": self.num_targets}

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


class LossMaskFile:
    """A read-only, memory-mapped PREFIX.mask, checked on open against its sidecar entry and the token count
    (size and header; the checksum only in verify(), so opening never hashes the file)."""

    def __init__(self, path: Path, entry, num_tokens: int, sidecar: Path):
        self.path = path
        if not isinstance(entry, dict):
            raise LossMaskError(f"{sidecar}: field \"loss_mask\" must be an object, got {type(entry).__name__}")
        if entry.get("file") != path.name:
            raise LossMaskError(f"{sidecar}: loss_mask.file is {entry.get('file')!r}, expected {path.name!r}")
        if entry.get("encoding") != MASK_ENCODING:
            raise LossMaskError(f"{sidecar}: loss_mask.encoding {entry.get('encoding')!r} is not supported "
                                f"(this reader knows {MASK_ENCODING!r})")
        if not path.is_file():
            raise LossMaskError(f"{path}: no such file, but {sidecar} lists a loss mask")
        self.entry = entry
        size = path.stat().st_size
        expected = mask_file_size(num_tokens)
        if entry.get("size") != size:
            raise LossMaskError(f"{path}: {size} bytes, but {sidecar} records {entry.get('size')!r}: the mask "
                                "belongs to another version of the prefix")
        if size != expected:
            raise LossMaskError(f"{path}: {size} bytes, expected {expected} for {num_tokens} tokens")
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic = bytes(self._buf[:8])
        version, n = struct.unpack("<QQ", self._buf[8:MASK_HEADER_SIZE])
        if magic != MASK_MAGIC:
            raise LossMaskError(f"{path}: not a loss-mask file (magic {magic!r}, expected {MASK_MAGIC!r})")
        if version != MASK_VERSION:
            raise LossMaskError(f"{path}: unsupported version {version} (this reader supports {MASK_VERSION})")
        if n != num_tokens:
            raise LossMaskError(f"{path}: header says {n} tokens, the .bin holds {num_tokens}")
        self.num_tokens = num_tokens
        self.payload = np.frombuffer(self._buf, dtype=np.uint8, offset=MASK_HEADER_SIZE)

    def bits(self, start: int, length: int) -> np.ndarray:
        """The mask of stream tokens [start, start + length) as a new bool array."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {start + length}) out of range ({self.num_tokens} tokens)")
        first = start // 8
        unpacked = np.unpackbits(self.payload[first : (start + length + 7) // 8], bitorder="little")
        skip = start - 8 * first
        return unpacked[skip : skip + length].view(np.bool_)

    def verify(self) -> None:
        """Check the sha256 the sidecar records and that the padding bits are 0; LossMaskError if not."""
        actual = file_sha256(self.path)
        if actual != self.entry.get("sha256"):
            raise LossMaskError(f"{self.path}: sha256 {actual} differs from the sidecar's {self.entry.get('sha256')!r}"
                                " (the mask is corrupt or belongs to other files)")
        used = self.num_tokens % 8
        if used and int(self.payload[-1]) >> used:
            raise LossMaskError(f"{self.path}: padding bits after the last token are not 0")
