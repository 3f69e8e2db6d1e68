"""Corpus access for every synthetic-data stage: source documents, a prefix with its tokenizer, document bodies,
the pair separator id and Parquet tables of document indices.

    docs = read_source_documents("quality/articles.jsonl")   # or a prefix; [SourceDoc(index, id, title, text)]
    corpus = PrefixCorpus("data/real")                        # the prefix and the tokenizer its sidecar names
    corpus.text(i, max_tokens=512)                            # document i decoded, without a leading BOS and its EOD
    starts, bodies = document_bodies(ds, eod_id)              # where each document starts, its length without EOD
    cols = read_index_columns("PAIRS.parquet", {"seed": (n, "data/real"), "target": (n, "data/real")})

Input formats and the tokenizer check: docs/synth.md, "Source documents"."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasynth.chat import PAIR_SEPARATOR, special_token_id
from megasynth.data.indexed import IndexedDataset, idx_path
from megasynth.data.prefix import sidecar_path
from megasynth.data.readers import InputError
from megasynth.data.sft_encode import separator_problem
from megasynth.io import read_jsonl
from megasynth.tokenizer import Tokenizer, TokenizerError, load_tokenizer


class CorpusError(ValueError):
    """A table of document indices that does not fit its corpus; one line naming the file (and the row)."""


# -- a prefix and its tokenizer ----------------------------------------------------------------------------------------
def recorded_tokenizer(ds: IndexedDataset) -> dict | None:
    """The tokenizer identity the prefix's sidecar records (Tokenizer.identity()), None without one."""
    recorded = (ds.metadata or {}).get("tokenizer")
    return recorded if isinstance(recorded, dict) else None


def check_tokenizer(ds: IndexedDataset, tok: Tokenizer, role: str = "the tokenizer") -> None:
    """TokenizerError unless `tok` is the tokenizer the prefix's sidecar records (when it records a checksum)."""
    recorded = recorded_tokenizer(ds) or {}
    sha, actual = recorded.get("sha256"), tok.identity()["sha256"]
    if sha and sha != actual:
        raise TokenizerError(f"{ds.prefix}: tokenized with {recorded.get('path')} (sha256 {sha[:12]}...), not with "
                             f"{role} {tok.path} (sha256 {actual[:12]}...): its ids would decode to other texts")


def prefix_tokenizer(ds: IndexedDataset, tokenizer: str | os.PathLike | None = None, *,
                     flag: str = "--tokenizer") -> Tokenizer:
    """`tokenizer`, else the one the prefix's sidecar names; checked against the sidecar (check_tokenizer)."""
    if tokenizer is None:
        recorded = recorded_tokenizer(ds)
        if recorded is None or not recorded.get("path"):
            raise TokenizerError(f"{sidecar_path(ds.prefix)}: names no tokenizer (a Megatron prefix or one written "
                                 f"without one); pass {flag} PATH")
        tokenizer = recorded["path"]
    tok = load_tokenizer(tokenizer)
    check_tokenizer(ds, tok)
    return tok


class PrefixCorpus:
    """The documents of a prefix as text, decoded with prefix_tokenizer(ds, tokenizer, flag=flag)."""

    def __init__(self, prefix: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                 flag: str = "--tokenizer"):
        self.prefix = os.fspath(prefix)
        self.ds = IndexedDataset(self.prefix)
        self.tokenizer = prefix_tokenizer(self.ds, tokenizer, flag=flag)
        self.tokenizer_sha256 = self.tokenizer.identity()["sha256"]
        self.eod_id = (self.ds.metadata or {}).get("eod_id", self.tokenizer.eod_id)

    def __len__(self) -> int:
        return len(self.ds)

    def text(self, i: int, max_tokens: int | None = None) -> str:
        """Document i's first `max_tokens` tokens (all when None) decoded, a leading BOS and a trailing EOD left out."""
        length = int(self.ds.sequence_lengths[i])
        ids = self.ds.get(i, 0, length if max_tokens is None else min(max_tokens, length)).tolist()
        bos = self.tokenizer.bos_id
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if ids and ids[-1] == self.eod_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)


def document_bodies(ds: IndexedDataset, eod_id: int | None,
                    indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(first token position in ds.tokens, number of tokens before the trailing EOD) of every document, or of
    `indices` only, as int64 arrays (eod_id None: no EOD to leave out)."""
    starts = ds.sequence_pointers.astype(np.int64) // ds.dtype.itemsize
    lengths = ds.sequence_lengths.astype(np.int64)
    if indices is not None:
        starts, lengths = starts[indices], lengths[indices]
    if eod_id is None or not ds.tokens.size:
        return starts, lengths
    last = np.where(lengths > 0, starts + lengths - 1, 0)
    return starts, lengths - ((lengths > 0) & (ds.tokens[last] == eod_id))


def pair_separator_id(tokenizer: Tokenizer, separator: str | None = None) -> int:
    """The id of the pair separator (default <|sep|>) as megasynth.data.sft's pair format defines it; TokenizerError
    naming the token and the tokenizer when it is not one id, or is the EOD."""
    separator = separator or PAIR_SEPARATOR
    sep_id = special_token_id(tokenizer, separator)
    if sep_id is None or sep_id == tokenizer.eod_id:
        raise TokenizerError(separator_problem(tokenizer, separator))
    return sep_id


# -- Parquet tables of document indices --------------------------------------------------------------------------------
def check_table_exists(path: str | os.PathLike) -> None:
    """CorpusError for a missing table, pointing at PATH.parquet when PATH is its stem (build_pairs.py's --output
    names the stem: its PAIRS.json beside it would otherwise seem to describe another table)."""
    path = Path(path)
    if path.is_file():
        return
    hint = f"; did you mean {path}.parquet?" if path.suffix != ".parquet" and Path(f"{path}.parquet").is_file() else ""
    raise CorpusError(f"{path}: no such file{hint}" if hint or not path.exists() else
                      f"{path}: not a file (expected a Parquet table)")


def read_index_columns(path: str | os.PathLike, columns: dict[str, tuple[int, str]]) -> dict[str, np.ndarray]:
    """The int64 columns of a Parquet table of document indices; `columns` maps each name to (the number of
    documents it indexes, the prefix they belong to). CorpusError naming the file, and the row counting from 0,
    for a missing file or column, a non-integer column, a null or an index outside [0, number)."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    check_table_exists(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    out = {}
    for name, (limit, prefix) in columns.items():
        if name not in table.column_names:
            raise CorpusError(f"{path}: no column {name!r} (expected columns {', '.join(columns)}, found "
                              f"{', '.join(table.column_names) or 'none'})")
        column = table.column(name)
        if not pa.types.is_integer(column.type):
            raise CorpusError(f"{path}: column {name!r} is {column.type}, expected int64 document indices")
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise CorpusError(f"{path}: row {row}: {name} is null")
        values = column.to_numpy().astype(np.int64, copy=False)
        bad = np.flatnonzero((values < 0) | (values >= limit))
        if bad.size:
            row = int(bad[0])
            raise CorpusError(f"{path}: row {row}: {name} {int(values[row])} is not a document of {prefix} "
                              f"({limit:,} documents); was the table made for another prefix?")
        out[name] = values
    return out


# -- the source documents of an LLM pipeline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceDoc:
    index: int  # position in the input, which orders the output
    id: str
    title: str | None
    text: str

    @property
    def display_title(self) -> str:
        """What the prompts call the document: its title, else its id."""
        return self.title if self.title else self.id


def read_source_documents(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> list[SourceDoc]:
    path = Path(path)
    if idx_path(path).is_file() and not path.is_file():
        corpus = PrefixCorpus(path, tokenizer, flag="--input-tokenizer")
        docs = [SourceDoc(i, str(i), None, corpus.text(i)) for i in range(len(corpus))]
        empty = next((d.index for d in docs if not d.text.strip()), None)
        if empty is not None:
            raise InputError(f"{path}: document {empty} decodes to an empty text")
    elif path.is_file():
        docs = _from_jsonl(path)
    else:
        raise InputError(f"{path}: no such file (expected documents JSONL, or a prefix PATH with PATH.bin/.idx)")
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs


def _from_jsonl(path: Path) -> list[SourceDoc]:
    docs: list[SourceDoc] = []
    first_line: dict[str, int] = {}
    for line_no, obj in read_jsonl(path):
        where = f"{path}:{line_no}"
        doc_id = obj.get("id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
            raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {doc_id!r}")
        doc_id = str(doc_id)
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: 'text' must be a non-empty string, got "
                             f"{type(text).__name__ if not isinstance(text, str) else 'an empty one'}")
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise InputError(f"{where}: 'title' must be a string when given, got {type(title).__name__}")
        if doc_id in first_line:
            raise InputError(f"{where}: duplicate id {doc_id!r} (first at line {first_line[doc_id]}); ids must be "
                             "unique, they key every request")
        first_line[doc_id] = line_no
        docs.append(SourceDoc(len(docs), doc_id, title or None, text))
    return docs


def documents_sha256(docs: list[SourceDoc]) -> str:
    """A checksum of the documents as the pipeline sees them (ids, titles, texts, order)."""
    digest = hashlib.sha256()
    for d in docs:
        for part in (d.id, d.title or "", d.text):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()
