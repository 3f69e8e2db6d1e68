"""A small real-text prefix for the embedding tests: the first stdlib docstrings, a byte-level BPE trained on
them, tokenized by the real preprocessing pipeline (so the sidecar names the tokenizer, as in normal use).

    from synth.stdlib_prefix import write_stdlib_prefix
    prefix, texts = write_stdlib_prefix(tmp_path, num_docs=40)   # PREFIX.bin/.idx/.json, the source texts
"""

from __future__ import annotations

import json
from pathlib import Path

from megasynth.data.preprocess import preprocess
from megasynth.data.stdlib_corpus import iter_stdlib_documents
from megasynth.tokenizer import train_bpe_tokenizer


def stdlib_texts(num_docs: int) -> list[str]:
    texts = []
    for _, text in iter_stdlib_documents():
        texts.append(text)
        if len(texts) == num_docs:
            break
    return texts


def write_stdlib_prefix(directory, num_docs: int = 40, vocab_size: int = 400,
                        extra_texts: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """`extra_texts` are appended after the stdlib documents (e.g. a near-copy of one of them)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(num_docs) + list(extra_texts)
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    train_bpe_tokenizer(texts, d / "tok", vocab_size=vocab_size)
    prefix = d / "corpus"
    preprocess([str(d / "docs.jsonl")], prefix, d / "tok", workers=0, progress=False)
    return str(prefix), texts
