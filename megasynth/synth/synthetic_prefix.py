"""Write generated texts as a synthetic prefix: PREFIX.bin/.idx/.json plus PREFIX.provenance.parquet.

    from megasynth.synth.synthetic_prefix import SyntheticDoc, write_synthetic_prefix
    docs = (SyntheticDoc(text, {"source_id": "b1", "step": "pair", "entities": ["A", "B"]}) for ...)
    sidecar = write_synthetic_prefix("data/entigraph", tokenizer, docs,
                                     columns={"source_id": pa.string(), "step": pa.string(),
                                              "entities": pa.list_(pa.string())},
                                     generator="entigraph", metadata={"synthetic": {...}}, overwrite=False)

A shared helper for generators whose texts come from records (EntiGraph, the rephrase baseline): the caller
yields the documents in the order it has fixed, so the same records give the same bytes. Each text is
tokenized whole with the given tokenizer and ends with its EOD (as tools/preprocess_data.py does), in batches,
so memory stays bounded whatever the number of documents.

The provenance table has one row per document of the prefix: `doc` (int64, its index in the prefix) and the
caller's `columns` (a pyarrow type each; every SyntheticDoc must give exactly those keys). The sidecar records
the generator (`created_by`), the tokenizer, the caller's metadata and the table's name, row count and sha256,
so a reader can tell the table belongs to these tokens.

Output rules are the project's: an existing prefix is refused unless `overwrite` (OutputExistsError),
an empty output unless `allow_empty`; the table is published (atomically) first and the prefix last, its .idx
being the commit point; a failure removes a table this call created and leaves no prefix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

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


def check_synthetic_output(prefix: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing prefix unless `overwrite` (call it before any expensive work). A provenance table
    with no prefix beside it is what a write interrupted between the two publishes leaves; it is replaced."""
    check_output_free(prefix, overwrite=overwrite)


def write_synthetic_prefix(
    prefix: str | os.PathLike, tokenizer: Tokenizer, docs: Iterable[SyntheticDoc], *, columns: dict[str, pa.DataType],
    generator: str, metadata: dict | None = None, late_metadata: Callable[[], dict] | None = None,
    overwrite: bool = False, allow_empty: bool = False, batch_size: int = 256,
) -> dict:
    """Tokenize `docs` (in the order given) into PREFIX and write their provenance table; return the sidecar.

    `late_metadata()`, when given, is called after the last document and its keys are added to the sidecar
    (for counts a generator only knows once its documents have been consumed)."""
    prefix = os.fspath(prefix)
    check_synthetic_output(prefix, overwrite=overwrite)
    if "doc" in columns:
        raise ValueError("provenance column 'doc' is added by write_synthetic_prefix itself")
    schema = pa.schema([("doc", pa.int64()), *columns.items()])
    prov = provenance_path(prefix)
    prov_existed = prov.exists()
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    meta = {"tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
            "append_eod": True, "add_bos": False, "created_by": generator, **(metadata or {})}
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    published = False
    try:
        with IndexedDatasetWriter(prefix, dtype, metadata=meta) as writer:
            with atomic_open(prov, "wb") as f, pq.ParquetWriter(f, schema) as table_writer:
                for batch in _batches(docs, batch_size):
                    # An LLM's reply is text: its only EOD is the one appended here (issue 19).
                    tokens, lengths = tokenizer.encode_batch_array([d.text for d in batch], append_eod=True,
                                                                   dtype=dtype, parse_special=False)
                    first = writer.num_documents
                    writer.add_flat(tokens, lengths)
                    table_writer.write_table(_provenance_table(batch, first, schema))
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


def _batches(docs: Iterable[SyntheticDoc], size: int) -> Iterator[list[SyntheticDoc]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _provenance_table(batch: list[SyntheticDoc], first: int, schema: pa.Schema) -> pa.Table:
    names = [n for n in schema.names if n != "doc"]
    for d in batch:
        if set(d.provenance) != set(names):
            raise ValueError(f"provenance keys {sorted(d.provenance)} differ from the columns {sorted(names)}")
    arrays = [pa.array(range(first, first + len(batch)), pa.int64())]
    arrays += [pa.array([d.provenance[n] for d in batch], schema.field(n).type) for n in names]
    return pa.Table.from_arrays(arrays, schema=schema)


