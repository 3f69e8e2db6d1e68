"""The source documents of an LLM pipeline (EntiGraph, rephrase): a JSONL file or an indexed prefix.

    docs = read_source_documents("quality/articles.jsonl")         # [SourceDoc(index, id, title, text), ...]
    docs = read_source_documents("data/books", tokenizer="tok/")    # a prefix: each document decoded
    documents_sha256(docs)                                          # what the work-dir manifest records

JSONL: one object a line, {"id": str or int, "title": str (optional), "text": str}; a missing or empty text,
a wrong type or a repeated id is an InputError naming FILE:LINE (the first line for a repeat, too). A prefix
(PATH.bin/.idx) gives one document per sequence, its trailing EOD removed, id = its index as a string and no
title; it is decoded with `tokenizer` when given, else with the tokenizer its sidecar names (whose checksum
must match the sidecar's). The source corpus of these pipelines is small (EntiGraph's QuALITY: 265 books,
1.3M tokens), so the documents are held in memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from megasynth.data.indexed import IndexedDataset, idx_path
from megasynth.data.readers import InputError
from megasynth.io import read_jsonl
from megasynth.tokenizer import load_tokenizer


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
        return _from_prefix(path, tokenizer)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected documents JSONL, or a prefix PATH with PATH.bin/.idx)")
    return _from_jsonl(path)


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
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs


def _from_prefix(prefix: Path, tokenizer_path) -> list[SourceDoc]:
    ds = IndexedDataset(prefix)
    meta = ds.metadata or {}
    ident = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else None
    if tokenizer_path is None:
        if ident is None or not ident.get("path"):
            raise InputError(f"{prefix}: its sidecar names no tokenizer; pass the tokenizer to decode it with")
        tokenizer_path = ident["path"]
        tok = load_tokenizer(tokenizer_path)
        if ident.get("sha256") and tok.identity()["sha256"] != ident["sha256"]:
            raise InputError(f"{prefix}: the tokenizer its sidecar names ({tokenizer_path}) has changed since the "
                             "prefix was written (checksum differs); pass the right tokenizer")
    else:
        tok = load_tokenizer(tokenizer_path)
    eod = meta.get("eod_id", tok.eod_id)
    docs = []
    for i in range(len(ds)):
        ids = ds[i]
        if ids.size and int(ids[-1]) == eod:
            ids = ids[:-1]
        text = tok.decode(ids.tolist())
        if not text.strip():
            raise InputError(f"{prefix}: document {i} decodes to an empty text")
        docs.append(SourceDoc(i, str(i), None, text))
    if not docs:
        raise InputError(f"{prefix}: no documents")
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
