"""Write generated texts as a synthetic prefix: PREFIX.bin/.idx/.json plus PREFIX.provenance.parquet.

    docs = (SyntheticDoc(text, {"source_id": "b1", "step": "pair", "entities": ["A", "B"]}) for ...)
    sidecar = write_synthetic_prefix("data/entigraph", tokenizer, docs,
                                     columns={"source_id": pa.string(), "step": pa.string(),
                                              "entities": pa.list_(pa.string())},
                                     generator="entigraph", late_metadata=lambda: {"synthetic": {...}},
                                     overwrite=False)

Order, the table, the sidecar and the commit point: docs/synth.md, "The synthetic prefix"."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megasynth.data.indexed import IndexedDatasetWriter, check_not_empty, check_output_free, smallest_token_dtype
from megasynth.io import atomic_open, file_sha256
from megasynth.tokenizer import Tokenizer

PROVENANCE_SUFFIX = ".provenance.parquet"


@dataclass(frozen=True)
class SyntheticDoc:
    text: str
    provenance: dict  # one value per provenance column


def provenance_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}{PROVENANCE_SUFFIX}")


def write_synthetic_prefix(
    prefix: str | os.PathLike, tokenizer: Tokenizer, docs: Iterable[SyntheticDoc], *, columns: dict[str, pa.DataType],
    generator: str, late_metadata: Callable[[], dict] | None = None,
    overwrite: bool = False, allow_empty: bool = False, batch_size: int = 256,
    tokenized: Iterable[tuple[np.ndarray, np.ndarray, dict]] | None = None,
) -> dict:
    """Tokenize `docs` (in the order given) into PREFIX and write their provenance table; return the sidecar.

    `late_metadata()`, when given, is called after the last document and its keys are added to the sidecar
    (for counts a generator only knows once its documents have been consumed). `tokenized`, instead of docs:
    documents already tokenized, as chunks (tokens with each document's EOD, lengths, {column: values}); each
    chunk is one row group of the table."""
    prefix = os.fspath(prefix)
    check_output_free(prefix, overwrite=overwrite)
    if "doc" in columns:
        raise ValueError("provenance column 'doc' is added by write_synthetic_prefix itself")
    schema = pa.schema([("doc", pa.int64()), *columns.items()])
    prov = provenance_path(prefix)
    prov_existed = prov.exists()
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    meta = {"tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
            "append_eod": True, "add_bos": False, "created_by": generator}
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    published = False
    try:
        with IndexedDatasetWriter(prefix, dtype, metadata=meta) as writer:
            with atomic_open(prov, "wb") as f, pq.ParquetWriter(f, schema) as table_writer:
                if tokenized is None:
                    tokenized = _tokenize(docs, tokenizer, dtype, batch_size, list(columns))
                for tokens, lengths, provenance in tokenized:
                    first = writer.num_documents
                    writer.add_flat(tokens, lengths)
                    table_writer.write_table(_provenance_table(provenance, first, len(lengths), schema))
                if writer.num_documents == 0:
                    table_writer.write_table(schema.empty_table())
            published = True
            check_not_empty(prefix, writer.num_documents, allow_empty=allow_empty)
            sidecar = writer.finalize(metadata={**(late_metadata() if late_metadata else {}), "provenance": {
                "file": prov.name, "rows": writer.num_documents, "sha256": file_sha256(prov),
                "columns": list(schema.names)}})
    except BaseException:
        if published and not prov_existed:
            prov.unlink(missing_ok=True)
        raise
    return sidecar


def _tokenize(docs: Iterable[SyntheticDoc], tokenizer: Tokenizer, dtype, size: int,
              names: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        # An LLM's reply is text: its only EOD is the one appended here.
        tokens, lengths = tokenizer.encode_batch_array([d.text for d in batch], append_eod=True, dtype=dtype,
                                                       parse_special=False)
        for d in batch:
            if set(d.provenance) != set(names):
                raise ValueError(f"provenance keys {sorted(d.provenance)} differ from the columns {sorted(names)}")
        yield tokens, lengths, {n: [d.provenance[n] for d in batch] for n in names}


def _provenance_table(columns: dict, first: int, rows: int, schema: pa.Schema) -> pa.Table:
    arrays = [pa.array(range(first, first + rows), pa.int64())]
    arrays += [pa.array(columns[n], schema.field(n).type) for n in schema.names[1:]]
    return pa.Table.from_arrays(arrays, schema=schema)


