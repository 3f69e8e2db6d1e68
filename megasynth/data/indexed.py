"""The indexed token format: a `.bin`/`.idx` pair (byte-compatible with Megatron-LM, version 1) plus a sidecar.

A *prefix* `data/x` names three files:

    data/x.bin    token ids of every document, concatenated, no header
    data/x.idx    header, int32 lengths[S], int64 byte pointers[S], int64 document indices[D]
    data/x.json   our sidecar: tokenizer identity, counts, sources, tool version (absent on Megatron's files)

The byte layout, the dtype codes and every sidecar key are described in docs/format.md. The writer streams:
its memory does not grow with the number of documents (Megatron's builder keeps the whole index in Python
lists, which runs out of memory on large corpora). Every write goes to temp files in the destination directory
that are renamed into place last, so an interrupted write never leaves a prefix that opens.

    with IndexedDatasetWriter("data/x", smallest_token_dtype(vocab_size), metadata={...}) as w:
        w.add_document([1, 2, 3])
        w.add_flat(np.array([4, 5, 6]), np.array([2, 0, 1]))  # three documents [4, 5], [], [6] in one call
    ds = IndexedDataset("data/x"); ds[0]  # -> array([1, 2, 3], dtype=uint16), a view into the memory map

Merging prefixes and length statistics live in megasynth/data/merge.py.
"""

from __future__ import annotations

import json
import mmap
import operator
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import megasynth

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic (9) + version <Q (8) + dtype code <B (1) + sequence count <Q (8) + document count <Q (8)
HEADER_SIZE = 34
SIDECAR_FORMAT = "megasynth-indexed"
SIDECAR_VERSION = 1
# Keys the writer computes itself; a caller's metadata may not set them.
RESERVED_SIDECAR_KEYS = ("format", "format_version", "tool_version", "dtype", "num_documents", "num_tokens")

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
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Entries per streamed chunk of the index (int32 lengths: 4 MiB; int64 pointers: 8 MiB). Bounds the
# writer's and the validator's memory whatever the number of documents.
_CHUNK = 1 << 20
_BIN_BUFFER = 8 << 20


class IndexedDatasetError(ValueError):
    """A prefix is missing, truncated or corrupt; the message names the file and what is wrong."""


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.json")


def prefix_exists(prefix: str | os.PathLike) -> bool:
    """True when both PREFIX.bin and PREFIX.idx exist (it says nothing about whether they are valid)."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def smallest_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id in [0, vocab_size) fits (vocab_size <= 65536), else int32 (Megatron's choice)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > 2**31:
        raise ValueError(f"vocab_size {vocab_size} does not fit the format's largest id type int32")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def _token_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"not a numpy dtype: {dtype!r}") from e
    dt = dt.newbyteorder("=") if dt.byteorder == ">" else dt
    if dt not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} has no code in the indexed format; expected one of {names}")
    return dt


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx/.json, one sequence per document: `add_document` appends one,
    `add_documents` a list of arrays, `add_flat` a flat token array with per-document lengths.

    A context manager: leaving the block normally finalizes, leaving it by an exception aborts (removes every
    temp file and leaves any existing prefix untouched).
    """

    def __init__(self, prefix: str | os.PathLike, dtype, *, metadata: dict | None = None):
        self.prefix = os.fspath(prefix)
        self.dtype = _token_dtype(dtype)
        self._metadata = dict(metadata or {})
        self._check_metadata(self._metadata)
        dest = Path(self.prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # Temps live beside the destination so the final os.replace is an atomic rename on one filesystem.
        self._tmp = {kind: dest.parent / f".{dest.name}.{kind}.{tag}" for kind in ("bin", "idx", "json", "lengths")}
        self._bin = open(self._tmp["bin"], "wb", buffering=_BIN_BUFFER)
        self._lengths_file = open(self._tmp["lengths"], "wb")
        self._lengths = np.empty(_CHUNK, dtype=np.int32)  # fixed-size buffer, flushed when full
        self._pending = 0
        self._num_documents = 0
        self._num_tokens = 0
        self._state = "open"
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._max_id = int(info.max)
        else:
            self._max_id = None  # float datasets (codes 6, 7) are allowed by the format; no id range applies

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return self._num_documents

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    # -- adding documents ---------------------------------------------------------------------------------------
    def add_document(self, tokens) -> None:
        """Append one document of token ids (a 1-D int array-like; may be empty)."""
        self._require_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"document must be a 1-D array of token ids, got shape {arr.shape}")
        lengths = self._checked_lengths(np.array([arr.size], dtype=np.int64), what="document")
        self._write(self._checked(arr, what="document"), lengths)

    def add_documents(self, docs: Sequence) -> None:
        """Append several documents at once: one range check and one write for the whole batch."""
        self._require_open()
        arrays = [np.asarray(d) for d in docs]
        if not arrays:
            return
        for i, a in enumerate(arrays):
            if a.ndim != 1:
                raise ValueError(f"document {i} of the batch must be 1-D, got shape {a.shape}")
        lengths = self._checked_lengths(np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays)))
        nonempty = [a for a in arrays if a.size]
        flat = np.concatenate(nonempty) if nonempty else np.empty(0, dtype=self.dtype)
        self._write(self._checked(flat, what="batch", lengths=lengths), lengths)

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents given as one flat array: document i is the next lengths[i] ids.

        The same bytes as add_document on each slice, with array-wide checks and one write instead of Python
        work per document (the preprocessor's path: its tokenizer already returns (tokens, lengths)). Memory
        stays bounded as for add_document: lengths are copied into the writer's fixed-size chunk buffer.
        Every check runs before anything is written, so a rejected batch leaves the writer as it was.
        """
        self._require_open()
        ln = self._checked_lengths(lengths)
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array of token ids, got shape {arr.shape}")
        total = int(ln.sum())
        if total != arr.size:
            raise ValueError(f"lengths sum to {total} tokens but the flat tokens array holds {arr.size}")
        self._write(self._checked(arr, what="batch", lengths=ln), ln)

    def _checked_lengths(self, lengths, *, what: str = "batch") -> np.ndarray:
        """lengths as int64, after checking they are integers in [0, 2**31) (the .idx stores them as int32)."""
        ln = np.asarray(lengths)
        if ln.ndim != 1:
            raise ValueError(f"{what}: lengths must be a 1-D array, got shape {ln.shape}")
        if ln.size == 0:
            return np.empty(0, dtype=np.int64)  # an empty list arrives as float64; its dtype is irrelevant
        if ln.dtype.kind not in "iu":
            raise ValueError(f"{what}: lengths must be integers, got dtype {ln.dtype}")
        # min/max reductions, not `ln < 0` masks: no temporary array as large as the batch on the happy path.
        # Both compare in the caller's dtype, before any cast could wrap a huge unsigned value.
        if ln.dtype.kind == "i" and int(ln.min()) < 0:
            i = int(np.argmax(ln < 0))
            raise ValueError(f"{what}: document {i} has negative length {int(ln[i])}")
        if int(ln.max()) >= 2**31:
            i = int(np.argmax(ln >= 2**31))
            raise ValueError(f"{what}: document {i} has {int(ln[i])} tokens; the format's int32 length field "
                             f"holds at most {2**31 - 1}")
        return ln.astype(np.int64, copy=False)

    def _checked(self, tokens, *, what: str, lengths: np.ndarray | None = None) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{what} must be a 1-D array of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return np.empty(0, dtype=self.dtype)  # an empty list arrives as float64; its dtype is irrelevant
        if self._max_id is not None:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
            if not np.can_cast(arr.dtype, self.dtype) or self.dtype.kind == "i":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi > self._max_id:
                    bad = lo if lo < 0 else hi
                    pos = int(np.argmax(arr == bad))
                    where = f"token {pos}"
                    if lengths is not None:  # name the document inside the batch, not the flat position
                        # ends[d] is where document d stops; side="right" skips the empty documents ending at pos
                        doc = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
                        where = f"document {doc} of the batch"
                    raise ValueError(
                        f"{what}: token id {bad} ({where}) does not fit {self.dtype}: ids must be in [0, {self._max_id}]"
                    )
        elif arr.dtype.kind not in "iuf":
            raise ValueError(f"{what}: expected numbers, got dtype {arr.dtype}")
        return arr.astype(self.dtype, copy=False)

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append validated tokens (already in self.dtype) and their int64 lengths."""
        if tokens.size:
            self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        self._num_documents += int(lengths.size)
        self._num_tokens += int(tokens.size)
        start = 0
        while start < lengths.size:
            take = min(_CHUNK - self._pending, lengths.size - start)
            self._lengths[self._pending : self._pending + take] = lengths[start : start + take]
            self._pending += take
            start += take
            if self._pending == _CHUNK:
                self._flush_lengths()

    def _flush_lengths(self) -> None:
        if self._pending:
            self._lengths_file.write(memoryview(self._lengths[: self._pending]).cast("B"))
            self._pending = 0

    # -- finishing ------------------------------------------------------------------------------------------------
    def finalize(self, metadata: dict | None = None) -> dict:
        """Write the .idx and the sidecar, then rename .bin, .idx and .json into place; return the sidecar."""
        self._require_open()
        extra = dict(metadata or {})
        self._check_metadata(extra)
        try:
            sidecar = {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_VERSION,
                "tool_version": megasynth.__version__,
                "dtype": self.dtype.name,
                "num_documents": self._num_documents,
                "num_tokens": self._num_tokens,
                **self._metadata,
                **extra,
            }
            try:
                text = json.dumps(sidecar, indent=2, sort_keys=False) + "\n"
            except (TypeError, ValueError) as e:
                raise ValueError(f"{sidecar_path(self.prefix)}: metadata is not JSON-serializable: {e}") from e
            self._flush_lengths()
            self._lengths_file.close()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_index()
            with open(self._tmp["json"], "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            # Remove the old index (and sidecar) first: a crash between the renames below then leaves a prefix
            # without a .idx (which does not open), never a new .bin beside an old .idx that might.
            for path in (idx_path(self.prefix), sidecar_path(self.prefix)):
                path.unlink(missing_ok=True)
            os.replace(self._tmp["bin"], bin_path(self.prefix))
            os.replace(self._tmp["idx"], idx_path(self.prefix))
            os.replace(self._tmp["json"], sidecar_path(self.prefix))
        except BaseException:
            self.abort()
            raise
        self._tmp["lengths"].unlink(missing_ok=True)
        self._state = "finalized"
        return sidecar

    def _write_index(self) -> None:
        n = self._num_documents
        itemsize = self.dtype.itemsize
        with open(self._tmp["idx"], "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<QBQQ", VERSION, _CODE_OF_DTYPE[self.dtype], n, n + 1))
            # Pass 1: the lengths, as written. Pass 2: byte pointers = exclusive prefix sum of lengths * itemsize,
            # carrying the running offset from chunk to chunk. Pass 3: document indices 0..n (one sequence per doc).
            with open(self._tmp["lengths"], "rb") as f:
                while (chunk := np.fromfile(f, dtype=np.int32, count=_CHUNK)).size:
                    out.write(memoryview(chunk.astype("<i4", copy=False)).cast("B"))
            running = 0
            with open(self._tmp["lengths"], "rb") as f:
                while (chunk := np.fromfile(f, dtype=np.int32, count=_CHUNK)).size:
                    nbytes = chunk.astype(np.int64) * itemsize
                    ends = np.cumsum(nbytes) + running
                    out.write(memoryview((ends - nbytes).astype("<i8", copy=False)).cast("B"))
                    running = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):
                out.write(memoryview(np.arange(start, min(start + _CHUNK, n + 1), dtype="<i8")).cast("B"))
            out.flush()
            os.fsync(out.fileno())

    def abort(self) -> None:
        """Discard everything written so far: close and remove every temp file. Safe to call twice."""
        for f in (self._bin, self._lengths_file):
            try:
                f.close()
            except OSError:
                pass
        for path in self._tmp.values():
            path.unlink(missing_ok=True)
        if self._state == "open":
            self._state = "aborted"

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.prefix}: writer is already {self._state}")

    @staticmethod
    def _check_metadata(metadata: dict) -> None:
        clash = [k for k in RESERVED_SIDECAR_KEYS if k in metadata]
        if clash:
            raise ValueError(f"metadata may not set {clash}: the writer computes these keys itself")

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._state == "open":
                self.finalize()
        else:
            self.abort()

    def __del__(self):
        # A writer dropped without finalize() must not leave temp files behind.
        if getattr(self, "_state", None) == "open":
            try:
                self.abort()
            except Exception:
                pass


def _map(path: Path, size: int):
    if size == 0:  # mmap cannot map an empty file
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """A read-only, memory-mapped view of PREFIX.bin/.idx (ours or Megatron-LM's), validated on open."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for path in (ipath, bpath):
            if not path.is_file():
                raise IndexedDatasetError(f"{path}: no such file (a prefix needs both .bin and .idx)")
        idx_size = ipath.stat().st_size
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
        for key, actual in (("num_documents", len(self)), ("num_tokens", self.num_tokens), ("dtype", self.dtype.name)):
            if meta.get(key) != actual:
                raise IndexedDatasetError(
                    f"{path}: field \"{key}\" is {meta.get(key)!r} but the binary has {actual!r} "
                    "(the sidecar belongs to other files)"
                )
        return meta

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
        j = self._index(i)
        start = int(self.sequence_pointers[j]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[j])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None), as a view."""
        j = self._index(i)
        n = int(self.sequence_lengths[j])
        length = n - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {j} of {n} tokens")
        start = int(self.sequence_pointers[j]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}  # memory maps do not pickle; DataLoader workers reopen the files

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_tokens} tokens, {self.dtype})"
