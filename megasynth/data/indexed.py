"""The indexed token format (a Megatron-compatible `.bin`/`.idx` pair plus our sidecar, docs/format.md): the
reader, re-exporting the writer (indexed_writer.py), the prefix paths and publish checks (prefix.py).

    ds = IndexedDataset("data/x"); ds[0]   # -> array([1, 2, 3], dtype=uint16), a view into the memory map
    ds.max_token_id                        # 3: from the sidecar, or computed once and cached for Megatron files
    ds.has_loss_mask, ds.loss_mask(0)      # masked prefixes: a bool array of document 0's length
"""

from __future__ import annotations

import hashlib
import json
import mmap
import operator
import os
import struct
from pathlib import Path

import numpy as np

from megasynth.data.indexed_writer import IndexedDatasetWriter
from megasynth.data.layout import (DTYPE_CODES, HEADER_SIZE, MAGIC, RESERVED_SIDECAR_KEYS, SIDECAR_FORMAT,
    SIDECAR_VERSION, SIDECAR_VERSIONS_READ, VERSION, is_count, smallest_token_dtype, vocab_sizes)
from megasynth.data.loss_mask import LossMaskFile
from megasynth.data.max_token_id import cached_max_token_id, max_of_tokens
from megasynth.data.prefix import (EmptyOutputError, IndexedDatasetError, OutputExistsError, PrefixOutputError,
    bin_path, check_not_empty, check_output_free, idx_path, mask_path, prefix_exists, sidecar_path)

__all__ = [
    "DTYPE_CODES", "HEADER_SIZE", "MAGIC", "RESERVED_SIDECAR_KEYS", "SIDECAR_FORMAT", "SIDECAR_VERSION", "VERSION",
    "EmptyOutputError", "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter", "OutputExistsError",
    "PrefixOutputError", "bin_path", "check_not_empty", "check_output_free", "idx_path", "mask_path",
    "prefix_exists", "sidecar_path", "smallest_token_dtype",
]

# Entries per chunk when validating the index: bounds the validator's memory whatever the number of documents.
_CHUNK = 1 << 20


def _map(path: Path, size: int):
    if size == 0:  # mmap cannot map an empty file
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# sha256 of each .idx hashed in this process, keyed by the file's identity (device, inode, size, mtime): every
# reopening (the start-up vocabulary check, the blend, held-out sets, DataLoader workers) reuses it, and a
# replaced or rewritten index has another identity, so it is hashed again.
_IDX_SHA256: dict[tuple[int, int, int, int], str] = {}


class IndexedDataset:
    """A read-only, memory-mapped view of PREFIX.bin/.idx (ours or Megatron-LM's), validated on open
    (docs/format.md: "Verified on open"; `verify()` reads every byte). `cache_dir` is where the largest id of a
    prefix without one in its sidecar is cached (default: beside the prefix; megasynth/data/max_token_id.py)."""

    def __init__(self, prefix: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
        self.prefix = os.fspath(prefix)
        self.cache_dir = cache_dir
        self._max_token_id: int | None = None
        self._mask: LossMaskFile | None = None
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for path in (ipath, bpath):
            if not path.is_file():
                raise IndexedDatasetError(f"{path}: no such file (a prefix needs both .bin and .idx)")
        idx_stat = ipath.stat()
        idx_size = idx_stat.st_size
        self._idx_identity = (idx_stat.st_dev, idx_stat.st_ino, idx_size, idx_stat.st_mtime_ns)
        if idx_size < HEADER_SIZE:
            raise IndexedDatasetError(f"{ipath}: truncated: expected at least {HEADER_SIZE} bytes, found {idx_size}")
        self._idx_buf = _map(ipath, idx_size)
        header = bytes(self._idx_buf[:HEADER_SIZE])
        if header[:9] != MAGIC:
            raise IndexedDatasetError(f"{ipath}: not a Megatron indexed dataset (magic {header[:9]!r}, expected {MAGIC!r})")
        version, code, num_seq, num_doc_idx = struct.unpack("<QBQQ", header[9:])
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported version {version} (this reader supports {VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{ipath}: unknown dtype code {code} (expected one of {sorted(DTYPE_CODES)})")
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + 12 * num_seq + 8 * num_doc_idx
        if idx_size != expected:
            if idx_size < expected:
                raise IndexedDatasetError(f"{ipath}: truncated: expected {expected} bytes, found {idx_size}")
            hint = " (Megatron's multimodal sequence modes are not supported)" if idx_size == expected + num_seq else ""
            raise IndexedDatasetError(f"{ipath}: expected {expected} bytes, found {idx_size}: trailing data{hint}")
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_buf, dtype="<i4", count=num_seq, offset=off)
        off += 4 * num_seq
        self.sequence_pointers = np.frombuffer(self._idx_buf, dtype="<i8", count=num_seq, offset=off)
        off += 8 * num_seq
        self.document_indices = np.frombuffer(self._idx_buf, dtype="<i8", count=num_doc_idx, offset=off)

        bin_size = bpath.stat().st_size
        self.num_tokens = self._validate_index(ipath, bpath, bin_size)
        expected_bin = self.num_tokens * self.dtype.itemsize
        if bin_size != expected_bin:
            if bin_size < expected_bin:
                raise IndexedDatasetError(f"{bpath}: truncated: expected {expected_bin} bytes, found {bin_size}")
            raise IndexedDatasetError(f"{bpath}: expected {expected_bin} bytes (from {ipath}), found {bin_size}")
        self._bin_buf = _map(bpath, bin_size)
        self.tokens = np.frombuffer(self._bin_buf, dtype=self.dtype.newbyteorder("<"), count=self.num_tokens)
        self.metadata = self._load_sidecar()
        if self.metadata is not None and self.metadata["format_version"] >= 2:
            self._check_files(idx_size, bin_size)
            self._max_token_id = self._check_max_token_id(self.metadata.get("max_token_id"))
            if "loss_mask" in self.metadata:
                self._mask = LossMaskFile(mask_path(self.prefix), self.metadata["loss_mask"], self.num_tokens,
                                          sidecar_path(self.prefix))
        if self._mask is None and mask_path(self.prefix).exists():
            # Our writer removes an old mask before publishing a prefix without one; a mask no sidecar lists
            # was left by something else and cannot be trusted to match these tokens.
            raise IndexedDatasetError(
                f"{mask_path(self.prefix)}: a loss mask that {sidecar_path(self.prefix)} does not list "
                f"({'no sidecar' if self.metadata is None else 'no loss_mask entry'}): stale, remove it or rewrite "
                "the prefix")

    def _validate_index(self, ipath: Path, bpath: Path, bin_size: int) -> int:
        """Check lengths, pointers and document indices in bounded chunks; return the number of tokens."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        itemsize = self.dtype.itemsize
        running = 0  # byte offset where the next sequence must start: sequences are contiguous and in order
        for start in range(0, lengths.size, _CHUNK):
            ln = lengths[start : start + _CHUNK].astype(np.int64)
            ptr = pointers[start : start + _CHUNK]
            if (ln < 0).any():
                i = start + int(np.argmax(ln < 0))
                raise IndexedDatasetError(f"{ipath}: sequence {i} has negative length {int(lengths[i])}")
            outside = (ptr < 0) | (ptr + ln * itemsize > bin_size)
            if outside.any():
                i = start + int(np.argmax(outside))
                raise IndexedDatasetError(
                    f"{ipath}: sequence {i} (byte pointer {int(pointers[i])}, {int(lengths[i])} tokens) "
                    f"is beyond the .bin ({bpath}: {bin_size} bytes)"
                )
            expect = np.cumsum(ln * itemsize) - ln * itemsize + running
            wrong = ptr != expect
            if wrong.any():
                i = start + int(np.argmax(wrong))
                raise IndexedDatasetError(
                    f"{ipath}: sequence {i} has byte pointer {int(pointers[i])}, expected {int(expect[i - start])} "
                    "(pointers must be the running sum of lengths * itemsize)"
                )
            running = int(expect[-1] + ln[-1] * itemsize)
        if docs.size == 0 or docs[0] != 0:
            raise IndexedDatasetError(f"{ipath}: document indices must start with 0, found {docs[:1].tolist()}")
        if docs[-1] != lengths.size:
            raise IndexedDatasetError(
                f"{ipath}: last document index is {int(docs[-1])}, expected the sequence count {lengths.size}"
            )
        for start in range(0, docs.size - 1, _CHUNK):
            d = docs[start : start + _CHUNK + 1]
            if (np.diff(d) < 0).any():
                i = start + int(np.argmax(np.diff(d) < 0)) + 1
                raise IndexedDatasetError(f"{ipath}: document indices decrease at entry {i}")
        return running // itemsize

    def _load_sidecar(self) -> dict | None:
        path = sidecar_path(self.prefix)
        if not path.is_file():
            return None  # Megatron-written prefixes have no sidecar
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise IndexedDatasetError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise IndexedDatasetError(f"{path}: not UTF-8 text: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            raise IndexedDatasetError(f"{path}: not a {SIDECAR_FORMAT} sidecar (missing \"format\": \"{SIDECAR_FORMAT}\")")
        if meta.get("format_version") not in SIDECAR_VERSIONS_READ:
            raise IndexedDatasetError(f"{path}: format_version {meta.get('format_version')!r} is not one this reader "
                                      f"knows ({', '.join(map(str, SIDECAR_VERSIONS_READ))}); a newer megasynth wrote it")
        for key, actual in (("num_documents", len(self)), ("num_tokens", self.num_tokens), ("dtype", self.dtype.name)):
            if meta.get(key) != actual:
                raise IndexedDatasetError(
                    f"{path}: field \"{key}\" is {meta.get(key)!r} but the binary has {actual!r} "
                    "(the sidecar belongs to other files)"
                )
        return meta

    def _check_files(self, idx_size: int, bin_size: int) -> None:
        """The sidecar's record of the .idx (size, sha256) and the .bin (size) must match the files on disk:
        a sidecar of one write beside the index of another is refused, whatever the counts say."""
        side, ipath = sidecar_path(self.prefix), idx_path(self.prefix)
        files = self.metadata.get("files")
        if not (isinstance(files, dict) and isinstance(files.get("idx"), dict) and isinstance(files.get("bin"), dict)):
            raise IndexedDatasetError(f"{side}: field \"files\" must be {{\"idx\": {{\"size\", \"sha256\"}}, "
                                      "\"bin\": {\"size\"}}")
        recorded_bin = files["bin"].get("size")
        if recorded_bin != bin_size:
            raise IndexedDatasetError(f"{side}: records {bin_path(self.prefix).name} of {recorded_bin!r} bytes, the file "
                                      f"has {bin_size}: the sidecar and {ipath.name} come from different writes")
        recorded_sha, recorded_size = files["idx"].get("sha256"), files["idx"].get("size")
        if recorded_size != idx_size or recorded_sha != self.idx_sha256:
            raise IndexedDatasetError(
                f"{side}: records {ipath.name} with sha256 {str(recorded_sha)[:16]}... ({recorded_size!r} bytes), the "
                f"file has {self.idx_sha256[:16]}... ({idx_size} bytes): the sidecar and the index come from different "
                f"writes (a stale {side.name}, or {ipath.name} replaced without it); rewrite the prefix, or delete "
                f"{side.name} to open the .bin/.idx alone")

    def _check_max_token_id(self, value) -> int | None:
        """The sidecar's max_token_id must be possible for these files and below every vocabulary size it states."""
        side = sidecar_path(self.prefix)
        if self.dtype.kind not in "iu":
            if value is not None:
                raise IndexedDatasetError(f"{side}: max_token_id must be null for a {self.dtype} dataset, got {value!r}")
            return None
        top = int(np.iinfo(self.dtype).max)
        if not is_count(value) or not -1 <= value <= top or (value == -1) != (self.num_tokens == 0):
            expect = "-1 (no tokens)" if self.num_tokens == 0 else f"an integer in [0, {top}]"
            raise IndexedDatasetError(f"{side}: max_token_id is {value!r}, expected {expect} for "
                                      f"{self.num_tokens} {self.dtype} tokens")
        self._check_vocab(int(value), side)
        return int(value)

    def _check_vocab(self, value: int, source) -> None:
        side = sidecar_path(self.prefix)
        for field, vocab in vocab_sizes(self.metadata):
            if not is_count(vocab) or vocab < 1:
                raise IndexedDatasetError(f"{side}: {field} must be a positive integer, got {vocab!r}")
            if value >= vocab:
                raise IndexedDatasetError(f"{source}: the largest token id is {value}, but {side.name} says {field} "
                                          f"{vocab}: ids must be below it")

    @property
    def idx_sha256(self) -> str:
        """sha256 of the .idx file (hashed once, on first use)."""
        sha = _IDX_SHA256.get(self._idx_identity)
        if sha is None:
            sha = _IDX_SHA256[self._idx_identity] = hashlib.sha256(self._idx_buf).hexdigest()
        return sha

    @property
    def max_token_id(self) -> int:
        """The largest token id in the .bin, -1 when it holds no tokens. From the sidecar when it records one
        (checked on open); otherwise scanned once and cached (megasynth/data/max_token_id.py)."""
        if self._max_token_id is None:
            if self.dtype.kind not in "iu":
                raise IndexedDatasetError(f"{idx_path(self.prefix)}: a {self.dtype} dataset holds no token ids")
            value, _ = cached_max_token_id(self.prefix, self.tokens, idx_sha256=self.idx_sha256,
                                           bin_path=bin_path(self.prefix), cache_dir=self.cache_dir)
            self._check_vocab(value, bin_path(self.prefix))
            self._max_token_id = value
        return self._max_token_id

    def verify(self) -> list[str]:
        """The checks opening skips because they read every byte: the .bin's largest id equals the sidecar's,
        and the mask's sha256 and padding bits are right. Raises IndexedDatasetError naming the file; returns
        what was checked (nothing for a prefix without a sidecar)."""
        done = []
        recorded = (self.metadata or {}).get("max_token_id")
        if self.dtype.kind in "iu" and recorded is not None:
            actual = max_of_tokens(self.tokens)
            if actual != recorded:
                raise IndexedDatasetError(f"{bin_path(self.prefix)}: the largest token id is {actual}, but "
                                          f"{sidecar_path(self.prefix)} records {recorded}: the .bin is corrupt")
            done.append("the .bin's largest id matches the sidecar")
        if self._mask is not None:
            self._mask.verify()
            done.append("the loss mask's sha256 matches the sidecar")
        return done

    # -- loss mask ------------------------------------------------------------------------------------------------
    @property
    def has_loss_mask(self) -> bool:
        """True when the prefix has a PREFIX.mask listed in its sidecar."""
        return self._mask is not None

    def _require_mask(self) -> LossMaskFile:
        if self._mask is None:
            raise IndexedDatasetError(f"{self.prefix}: has no loss mask (no {mask_path(self.prefix).name} listed in "
                                      "its sidecar); check has_loss_mask, or train on every token")
        return self._mask

    def loss_mask(self, i) -> np.ndarray:
        """Sequence i's loss mask: a new bool array of its length (True = predict this token)."""
        return self._require_mask().bits(*self._token_range(i, 0, None))

    def loss_mask_slice(self, i, offset: int, length: int) -> np.ndarray:
        """The loss mask of tokens [offset, offset + length) of sequence i (the window `get(i, offset, length)`)."""
        return self._require_mask().bits(*self._token_range(i, offset, length))

    def loss_mask_tokens(self, start: int, length: int) -> np.ndarray:
        """The loss mask of tokens [start, start + length) of the whole .bin stream, across documents."""
        return self._require_mask().bits(start, length)

    # -- tokens ---------------------------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        """Documents as the .idx groups them (equal to len(self) for files written by megasynth)."""
        return self.document_indices.size - 1

    def __len__(self) -> int:
        return self.sequence_lengths.size

    def _index(self, i) -> int:
        n = len(self)
        try:
            j = operator.index(i)
        except TypeError:
            raise TypeError(f"sequence index must be an integer, got {type(i).__name__}") from None
        if not -n <= j < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        return j + n if j < 0 else j

    def __getitem__(self, i) -> np.ndarray:
        """Sequence i's tokens: a read-only view into the memory-mapped .bin (no copy)."""
        return self.get(i)

    def _token_range(self, i, offset: int, length: int | None) -> tuple[int, int]:
        """(stream start, length) of tokens [offset, offset + length) of sequence i, bounds-checked."""
        j = self._index(i)
        n = int(self.sequence_lengths[j])
        length = n - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {j} of {n} tokens")
        return int(self.sequence_pointers[j]) // self.dtype.itemsize + offset, length

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None), as a view."""
        start, length = self._token_range(i, offset, length)
        return self.tokens[start : start + length]

    def __getstate__(self) -> dict:
        # memory maps do not pickle; DataLoader workers reopen the files
        state = {"prefix": self.prefix, "cache_dir": self.cache_dir}
        if self._idx_identity in _IDX_SHA256:  # a spawned worker does not inherit the memo: hand it the entry
            state["idx_sha256"] = (self._idx_identity, _IDX_SHA256[self._idx_identity])
        return state

    def __setstate__(self, state: dict) -> None:
        if "idx_sha256" in state:
            identity, sha = state["idx_sha256"]
            _IDX_SHA256.setdefault(tuple(identity), sha)
        self.__init__(state["prefix"], cache_dir=state.get("cache_dir"))

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_tokens} tokens, {self.dtype})"
