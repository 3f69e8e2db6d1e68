"""The streaming writer of the indexed format (bounded memory, largest id recorded, atomic publish: docs/format.md).
Import it from megasynth.data.indexed, which also holds the reader.

    with IndexedDatasetWriter("data/x", smallest_token_dtype(vocab_size), metadata={...}) as w:
        w.add_document([1, 2, 3])
        w.add_flat(np.array([4, 5, 6]), np.array([2, 0, 1]))  # three documents [4, 5], [], [6] in one call
    with IndexedDatasetWriter("data/sft", np.uint16, loss_mask=True) as w:   # True = predict this token
        w.add_document([1, 2, 3], loss_mask=np.array([False, True, True]))
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import megasynth
from megasynth.data.layout import (CODE_OF_DTYPE, MAGIC, RESERVED_SIDECAR_KEYS, SIDECAR_FORMAT, SIDECAR_VERSION,
    VERSION, is_count, token_dtype, vocab_sizes)
from megasynth.data.loss_mask import LossMaskWriter, checked_mask
from megasynth.data.prefix import mask_path, publish_prefix, sidecar_path, temp_paths

# Entries per streamed chunk of the index (int32 lengths: 4 MiB; int64 pointers: 8 MiB). Bounds the
# writer's memory whatever the number of documents.
_CHUNK = 1 << 20
_BIN_BUFFER = 8 << 20


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx/.json, one sequence per document: `add_document` appends one,
    `add_documents` a list of arrays, `add_flat` a flat token array with per-document lengths.

    With `loss_mask=True` every call also takes a per-token boolean mask (True = predict this token), stored
    in PREFIX.mask; without it, passing a mask is an error. A context manager: leaving the block normally
    finalizes, leaving it by an exception aborts (removes every temp file, leaves any existing prefix as it was).
    """

    def __init__(self, prefix: str | os.PathLike, dtype, *, metadata: dict | None = None, loss_mask: bool = False):
        self.prefix = os.fspath(prefix)
        self.dtype = token_dtype(dtype)
        self._metadata = dict(metadata or {})
        self._check_metadata(self._metadata)
        self._vocab = self._checked_vocab_sizes(self._metadata)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        kinds = ("bin", "idx", "json", "lengths") + (("mask",) if loss_mask else ())
        # Temps live beside the destination so the final renames are atomic on one filesystem.
        self._tmp = temp_paths(self.prefix, kinds)
        self._state = "open"
        self._bin = open(self._tmp["bin"], "wb", buffering=_BIN_BUFFER)
        self._lengths_file = open(self._tmp["lengths"], "wb")
        self._mask = LossMaskWriter(self._tmp["mask"], mask_path(self.prefix).name) if loss_mask else None
        self._lengths = np.empty(_CHUNK, dtype=np.int32)  # fixed-size buffer, flushed when full
        self._pending = 0
        self._num_documents = 0
        self._num_tokens = 0
        self._max_token = -1
        # float datasets (codes 6, 7) are allowed by the format; no id range applies to them
        self._max_id = int(np.iinfo(self.dtype).max) if self.dtype.kind in "iu" else None

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return self._num_documents

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    # -- adding documents ---------------------------------------------------------------------------------------
    def add_document(self, tokens, *, loss_mask=None) -> None:
        """Append one document of token ids (a 1-D int array-like; may be empty) and, for a masked writer,
        its loss mask (one bool per token)."""
        self._require_open()
        arr = np.asarray(tokens)
        lengths = self._checked_lengths(np.array([arr.size], dtype=np.int64), what="document")
        checked, hi = self._checked(arr, what="document")  # "document must be a 1-D array ..." when it is not
        mask = self._checked_mask(loss_mask, arr.size, "add_document")
        self._write(checked, lengths, hi, mask)

    def add_documents(self, docs: Sequence, *, loss_masks: Sequence | None = None) -> None:
        """Append several documents at once (one range check and one write for the whole batch); a masked
        writer also takes one mask per document."""
        self._require_open()
        arrays = [np.asarray(d) for d in docs]
        if self._mask is not None and loss_masks is not None and len(loss_masks) != len(arrays):
            raise ValueError(f"add_documents: {len(loss_masks)} loss masks for {len(arrays)} documents")
        if not arrays:
            self._checked_mask(loss_masks, 0, "add_documents")
            return
        for i, a in enumerate(arrays):
            if a.ndim != 1:
                raise ValueError(f"document {i} of the batch must be 1-D, got shape {a.shape}")
        lengths = self._checked_lengths(np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays)))
        nonempty = [a for a in arrays if a.size]
        flat = np.concatenate(nonempty) if nonempty else np.empty(0, dtype=self.dtype)
        checked, hi = self._checked(flat, what="batch", lengths=lengths)
        if loss_masks is not None and self._mask is not None:
            mask = np.concatenate([checked_mask(m, a.size, f"add_documents: document {i}")
                                   for i, (m, a) in enumerate(zip(loss_masks, arrays))])
        else:  # raises when a mask is missing or not expected
            mask = self._checked_mask(loss_masks, flat.size, "add_documents")
        self._write(checked, lengths, hi, mask)

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray, *, loss_mask=None) -> None:
        """Append len(lengths) documents given as one flat array: document i is the next lengths[i] ids.

        The same bytes as add_document on each slice, with array-wide checks and one write instead of Python
        work per document (the preprocessor's path: its tokenizer already returns (tokens, lengths)). A masked
        writer takes `loss_mask`, a bool array as long as `tokens`. Memory stays bounded as for add_document:
        lengths are copied into the writer's fixed-size chunk buffer. Every check runs before anything is
        written, so a rejected batch leaves the writer as it was.
        """
        self._require_open()
        ln = self._checked_lengths(lengths)
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array of token ids, got shape {arr.shape}")
        total = int(ln.sum())
        if total != arr.size:
            raise ValueError(f"lengths sum to {total} tokens but the flat tokens array holds {arr.size}")
        checked, hi = self._checked(arr, what="batch", lengths=ln)
        mask = self._checked_mask(loss_mask, arr.size, "add_flat")
        self._write(checked, ln, hi, mask)

    def _checked_mask(self, loss_mask, num_tokens: int, method: str) -> np.ndarray | None:
        if self._mask is None:
            if loss_mask is not None:
                raise ValueError(f"{self.prefix}: {method} got a loss mask, but this writer stores none; create it "
                                 "with IndexedDatasetWriter(..., loss_mask=True)")
            return None
        if loss_mask is None:
            raise ValueError(f"{self.prefix}: this writer was created with loss_mask=True, so {method} needs "
                             "loss_mask= (one bool per token, True = predict it)")
        return checked_mask(loss_mask, num_tokens, method)

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

    def _checked(self, tokens, *, what: str, lengths: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """(tokens in self.dtype, their largest id or -1) after the range checks; float datasets give -1."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{what} must be a 1-D array of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return np.empty(0, dtype=self.dtype), -1  # an empty list arrives as float64; its dtype is irrelevant
        if self._max_id is None:
            if arr.dtype.kind not in "iuf":
                raise ValueError(f"{what}: expected numbers, got dtype {arr.dtype}")
            return arr.astype(self.dtype, copy=False), -1
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
        # One max per batch (the sidecar's max_token_id needs it anyway); a min only where ids can be negative.
        hi = int(arr.max())
        lo = int(arr.min()) if arr.dtype.kind == "i" else 0
        if lo < 0 or hi > self._max_id:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: token id {bad} ({self._where(arr, bad, lengths)}) does not fit {self.dtype}: "
                             f"ids must be in [0, {self._max_id}]")
        for field, vocab in self._vocab:
            if hi >= vocab:
                raise ValueError(f"{what}: token id {hi} ({self._where(arr, hi, lengths)}) is outside the vocabulary: "
                                 f"the metadata's {field} is {vocab}")
        return arr.astype(self.dtype, copy=False), hi

    @staticmethod
    def _where(arr: np.ndarray, bad: int, lengths: np.ndarray | None) -> str:
        pos = int(np.argmax(arr == bad))
        if lengths is None:
            return f"token {pos}"
        # Name the document inside the batch, not the flat position. ends[d] is where document d stops;
        # side="right" skips the empty documents ending at pos.
        return f"document {int(np.searchsorted(np.cumsum(lengths), pos, side='right'))} of the batch"

    def _write(self, tokens: np.ndarray, lengths: np.ndarray, hi: int, mask: np.ndarray | None) -> None:
        """Append validated tokens (already in self.dtype), their int64 lengths, largest id and mask."""
        if mask is not None:
            self._mask.add(mask)
        if tokens.size:
            self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        self._num_documents += int(lengths.size)
        self._num_tokens += int(tokens.size)
        self._max_token = max(self._max_token, hi)
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
        """Write the .idx, the mask and the sidecar, publish them (megasynth.data.prefix); return the sidecar."""
        self._require_open()
        extra = dict(metadata or {})
        self._check_metadata(extra)
        try:
            meta = {**self._metadata, **extra}
            try:
                json.dumps(meta)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{sidecar_path(self.prefix)}: metadata is not JSON-serializable: {e}") from e
            for field, vocab in self._checked_vocab_sizes(meta):
                if self._max_token >= vocab:
                    raise ValueError(f"{self.prefix}: token id {self._max_token} is outside the vocabulary: the "
                                     f"metadata's {field} is {vocab}")
            self._flush_lengths()
            self._lengths_file.close()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            idx_size, idx_sha256 = self._write_index()
            sidecar = {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_VERSION,
                "tool_version": megasynth.__version__,
                "dtype": self.dtype.name,
                "num_documents": self._num_documents,
                "num_tokens": self._num_tokens,
                "max_token_id": self._max_token if self._max_id is not None else None,
                "files": {"idx": {"size": idx_size, "sha256": idx_sha256},
                          "bin": {"size": self._num_tokens * self.dtype.itemsize}},
            }
            if self._mask is not None:
                sidecar["loss_mask"] = self._mask.finish()
            sidecar.update(meta)
            with open(self._tmp["json"], "w", encoding="utf-8") as f:
                f.write(json.dumps(sidecar, indent=2, sort_keys=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            publish_prefix(self.prefix, {k: v for k, v in self._tmp.items() if k != "lengths"})
        except BaseException:
            self.abort()
            raise
        self._tmp["lengths"].unlink(missing_ok=True)
        self._state = "finalized"
        return sidecar

    def _write_index(self) -> tuple[int, str]:
        """Write the temp .idx; return its size and sha256 (hashed as written, so never read back)."""
        n = self._num_documents
        itemsize = self.dtype.itemsize
        digest = hashlib.sha256()
        size = 0
        with open(self._tmp["idx"], "wb") as out:
            def put(data) -> None:
                nonlocal size
                out.write(data)
                digest.update(data)
                size += len(data) if isinstance(data, bytes) else data.nbytes

            put(MAGIC)
            put(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            # Pass 1: the lengths, as written. Pass 2: byte pointers = exclusive prefix sum of lengths * itemsize,
            # carrying the running offset from chunk to chunk. Pass 3: document indices 0..n (one sequence per doc).
            with open(self._tmp["lengths"], "rb") as f:
                while (chunk := np.fromfile(f, dtype=np.int32, count=_CHUNK)).size:
                    put(memoryview(chunk.astype("<i4", copy=False)).cast("B"))
            running = 0
            with open(self._tmp["lengths"], "rb") as f:
                while (chunk := np.fromfile(f, dtype=np.int32, count=_CHUNK)).size:
                    nbytes = chunk.astype(np.int64) * itemsize
                    ends = np.cumsum(nbytes) + running
                    put(memoryview((ends - nbytes).astype("<i8", copy=False)).cast("B"))
                    running = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):
                put(memoryview(np.arange(start, min(start + _CHUNK, n + 1), dtype="<i8")).cast("B"))
            out.flush()
            os.fsync(out.fileno())
        return size, digest.hexdigest()

    def abort(self) -> None:
        """Discard everything written so far: close and remove every temp file. Safe to call twice."""
        for f in (getattr(self, "_bin", None), getattr(self, "_lengths_file", None), getattr(self, "_mask", None)):
            try:
                if f is not None:
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

    def _checked_vocab_sizes(self, metadata: dict) -> list[tuple[str, int]]:
        found = vocab_sizes(metadata)
        for field, value in found:
            if not is_count(value) or value < 1:
                raise ValueError(f"{self.prefix}: metadata {field} must be a positive integer, got {value!r}")
        return [(field, int(value)) for field, value in found]

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
