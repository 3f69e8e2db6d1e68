"""The demo's real-text corpus: deterministic, non-trivial, split without overlap."""

import json

from megasynth.data.stdlib_corpus import is_heldout, write_stdlib_corpus


def test_corpus_is_real_text_split_deterministically(tmp_path):
    counts = write_stdlib_corpus(tmp_path / "a", valid_fraction=0.05)
    # CPython's standard library holds well over a thousand long docstrings (about 2,400 on 3.11).
    assert counts["train"]["documents"] > 1000
    assert counts["train"]["characters"] > 500_000
    assert 0 < counts["valid"]["documents"] < counts["train"]["documents"] * 0.15
    rows = {split: [json.loads(line) for line in open(tmp_path / "a" / f"{split}.jsonl")] for split in ("train", "valid")}
    origins = {split: {r["origin"] for r in rs} for split, rs in rows.items()}
    assert not origins["train"] & origins["valid"]
    assert all(is_heldout(o, 0.05) for o in origins["valid"])
    assert any(r["text"].startswith("A MutableMapping is a generic container") for rs in rows.values() for r in rs)
    assert all(len(r["text"]) >= 200 for r in rows["train"])
    # The split is a pure function of each document's origin (a hash), not of file order or the machine.
    assert all(not is_heldout(o, 0.05) for o in origins["train"])
    assert not is_heldout("x", 0.0) and is_heldout("x", 1.0)
    assert not list((tmp_path / "a").glob(".*tmp*"))
