"""Constructed corpora for the SBP quality tests: real text on every machine, prefixes with known answers.

    corpus = build_corpus(tmp_path)                      # Corpus(prefix, tokenizer, docs: list of token arrays)
    write_synthetic(tmp_path / "syn", corpus, docs=[...], seeds=[...])   # prefix + .provenance.parquet

The corpus is the docstrings of a fixed list of standard-library objects from unrelated areas (JSON, regular
expressions, heaps, archives, time zones, ...), cut to their first 600 characters and tokenized with a small
byte-level BPE trained on them, so embeddings see real English and random pairs are unrelated.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megasynth.data.indexed import IndexedDatasetWriter, smallest_token_dtype
from megasynth.tokenizer import Tokenizer, train_bpe_tokenizer

OBJECTS = [
    "json.dumps", "json.loads", "re.sub", "re.compile", "heapq.merge", "heapq.nsmallest", "zipfile.ZipFile",
    "tarfile.open", "zoneinfo.ZoneInfo", "datetime.timedelta", "shutil.copytree", "shutil.rmtree",
    "subprocess.run", "socket.create_connection", "textwrap.dedent", "textwrap.wrap", "collections.Counter",
    "collections.OrderedDict", "functools.lru_cache", "functools.partial", "itertools.groupby",
    "itertools.product", "random.shuffle", "random.choices", "statistics.median", "statistics.stdev",
    "hashlib.pbkdf2_hmac", "base64.b64encode", "csv.DictReader", "sqlite3.connect", "urllib.parse.urlsplit",
    "email.message_from_string", "threading.Lock", "asyncio.gather", "logging.basicConfig",
    "argparse.ArgumentParser", "difflib.SequenceMatcher", "fractions.Fraction", "decimal.Decimal", "uuid.uuid4",
]
REPEATED_SENTENCE = "The cat sat on the mat and looked at the door for a long time."


@dataclass
class Corpus:
    prefix: str
    tokenizer: Tokenizer
    texts: list[str]
    docs: list[np.ndarray]  # token ids, EOD appended, as written


def stdlib_texts(max_chars: int = 600) -> list[str]:
    texts = []
    for name in OBJECTS:
        module, _, attr = name.rpartition(".")
        doc = inspect.getdoc(getattr(importlib.import_module(module), attr)) or ""
        if len(doc) >= 120:
            texts.append(doc[:max_chars])
    return texts


def write_prefix(prefix: str | os.PathLike, tokenizer: Tokenizer, docs: list[np.ndarray], extra: dict | None = None
                 ) -> str:
    prefix = os.fspath(prefix)
    meta = {"tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
            **(extra or {})}
    with IndexedDatasetWriter(prefix, smallest_token_dtype(tokenizer.vocab_size), metadata=meta) as writer:
        writer.add_documents(docs)
    return prefix


def build_corpus(root: Path) -> Corpus:
    texts = stdlib_texts()
    tokenizer = train_bpe_tokenizer(texts + [REPEATED_SENTENCE], root / "tokenizer", vocab_size=600)
    docs = [np.array(tokenizer.encode(t, append_eod=True), dtype=np.int64) for t in texts]
    return Corpus(write_prefix(root / "corpus", tokenizer, docs), tokenizer, texts, docs)


def encode(corpus: Corpus, text: str) -> np.ndarray:
    return np.array(corpus.tokenizer.encode(text, append_eod=True), dtype=np.int64)


def write_synthetic(prefix: str | os.PathLike, corpus: Corpus, docs: list[np.ndarray], seeds: list[int],
                    extra: dict | None = None) -> str:
    """A synthetic prefix of `docs` whose provenance gives document i the corpus seed seeds[i]; `extra` goes
    into its sidecar (as tools/synthesize.py's "synthesis" and "provenance" entries)."""
    prefix = write_prefix(prefix, corpus.tokenizer, docs, extra)
    table = pa.table({"doc": pa.array(range(len(docs)), pa.int64()), "seed": pa.array(seeds, pa.int64())})
    pq.write_table(table, prefix + ".provenance.parquet")
    return prefix


def write_pairs(path: str | os.PathLike, seeds: list[int], targets: list[int]) -> str:
    table = pa.table({"seed": pa.array(seeds, pa.int64()), "target": pa.array(targets, pa.int64()),
                      "similarity": pa.array([0.5] * len(seeds), pa.float32())})
    pq.write_table(table, path)
    return os.fspath(path)
