"""The embeddings files of SBP stage 1: EMB.npy (float16 [documents, dim], unit rows) and its sidecar EMB.json.

    emb, meta = load_embeddings("runs/emb")      # emb: read-only np.memmap, meta: the EMB.json dict
    emb[i]                                       # document i's unit vector (float16)
    check_against_prefix(meta, "data/train", n_rows=emb.shape[0])   # the prefix the rows belong to

The format: docs/sbp.md, "File formats"."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from megasynth.data.indexed import IndexedDataset
from megasynth.io import file_sha256

EMB_FORMAT = "megasynth-embeddings"
EMB_FORMAT_VERSION = 1


class EmbeddingsError(ValueError):
    """Embeddings that are missing, inconsistent or do not belong to the given corpus; one line, names the file."""


def emb_stem(output: str | os.PathLike) -> str:
    """EMB from EMB, EMB.npy or EMB.json."""
    out = os.fspath(output)
    return out.removesuffix(".npy") if out.endswith(".npy") else out.removesuffix(".json")


def emb_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """(EMB.npy, EMB.json)."""
    stem = emb_stem(output)
    return Path(f"{stem}.npy"), Path(f"{stem}.json")


def work_dir(output: str | os.PathLike) -> Path:
    """Where an embedding run keeps its shard files and manifest until it publishes EMB (then removed)."""
    return Path(f"{emb_stem(output)}.embed-work")


def npy_header(n_rows: int, dim: int) -> bytes:
    """The .npy header of a C-order little-endian float16 array [n_rows, dim] (what np.save would write)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (n_rows, dim)})
    return buf.getvalue()


def load_embeddings(output: str | os.PathLike, *, verify_sha: bool = False) -> tuple[np.ndarray, dict]:
    """(read-only memmap of EMB.npy, EMB.json as a dict), after checking that the two belong together."""
    npy, side = emb_paths(output)
    if not side.is_file():
        hint = " (EMB.npy exists: the run that wrote it did not finish)" if npy.is_file() else ""
        raise EmbeddingsError(f"{side}: no such file{hint}; run tools/embed_corpus.py first")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EmbeddingsError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EMB_FORMAT:
        raise EmbeddingsError(f"{side}: not an embeddings sidecar (missing \"format\": \"{EMB_FORMAT}\")")
    if meta.get("format_version") != EMB_FORMAT_VERSION:
        raise EmbeddingsError(f"{side}: format_version {meta.get('format_version')!r} is not {EMB_FORMAT_VERSION}")
    if not npy.is_file():
        raise EmbeddingsError(f"{npy}: no such file (named by {side})")
    try:
        emb = np.load(npy, mmap_mode="r")
    except ValueError as e:
        raise EmbeddingsError(f"{npy}: not a readable .npy file ({e})") from None
    expected = (meta.get("num_documents"), meta.get("dim"))
    if emb.ndim != 2 or emb.shape != expected or emb.dtype != np.float16:
        raise EmbeddingsError(f"{npy}: holds {emb.dtype} {list(emb.shape)}, but {side.name} describes float16 "
                              f"{list(expected)}: the two files come from different runs")
    recorded = meta.get("files", {}).get("npy", {})
    size = npy.stat().st_size
    if recorded.get("size") != size:
        raise EmbeddingsError(f"{side}: records {npy.name} of {recorded.get('size')!r} bytes, the file has {size}: "
                              "the two files come from different runs")
    if verify_sha and recorded.get("sha256") != file_sha256(npy):
        raise EmbeddingsError(f"{npy}: sha256 differs from the one {side.name} records (the file changed)")
    return emb, meta


def check_against_prefix(meta: dict, prefix: str | os.PathLike, *, n_rows: int, source: str = "EMB.json"):
    """The prefix's IndexedDataset; EmbeddingsError unless the embeddings were made from it (row count, .idx sha256)."""
    ds = IndexedDataset(prefix)
    if len(ds) != n_rows:
        raise EmbeddingsError(f"{source}: {n_rows} embedding rows but {os.fspath(prefix)} has {len(ds)} documents: "
                              "the embeddings belong to another corpus")
    inp = meta.get("input", {})
    if inp.get("type") != "prefix":
        raise EmbeddingsError(f"{source}: the embeddings were made from {inp.get('type')!r} input, not a prefix, so "
                              f"nothing ties their rows to {os.fspath(prefix)}")
    if inp.get("idx_sha256") != ds.idx_sha256:
        recorded = str(inp.get("idx_sha256"))[:16]
        raise EmbeddingsError(f"{source}: made from a prefix whose .idx sha256 is {recorded}..., "
                              f"{os.fspath(prefix)}.idx has {ds.idx_sha256[:16]}...: the embeddings belong to another "
                              "corpus (or the prefix was rewritten); embed it again")
    return ds


def check_unit_rows(emb: np.ndarray, *, tol: float = 1e-2, chunk: int = 1 << 16, source: str = "EMB.npy") -> None:
    """Raise EmbeddingsError naming the first row whose L2 norm is not 1 within `tol` (or is not finite).

    float16 storage rounds each component to 11 significant bits, so a unit float32 vector stored in float16
    has a norm within ~1e-3 of 1; 1e-2 accepts that and refuses anything not normalised at all."""
    for start in range(0, emb.shape[0], chunk):
        block = np.asarray(emb[start:start + chunk], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        bad = ~(np.abs(norms - 1.0) <= tol)  # NaN fails the comparison, so it is bad too
        if bad.any():
            i = int(np.argmax(bad))
            raise EmbeddingsError(f"{source}: row {start + i} has L2 norm {norms[i]:.4g}, expected 1 (+-{tol}): the "
                                  "rows must be unit vectors (inner product = cosine similarity)")
