"""The largest token id: recorded by the writer, checked at open against the vocabulary the sidecar states,
scanned once and cached for prefixes whose sidecar does not record it (Megatron's files, format 1)."""

import json
import os

import numpy as np
import pytest

from megasynth.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
)
from megasynth.data.max_token_id import max_of_tokens


def write(prefix, docs, dtype=np.uint16, metadata=None):
    with IndexedDatasetWriter(prefix, dtype, metadata=metadata) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def sidecar(prefix):
    return json.loads(open(f"{prefix}.json").read())


def set_sidecar(prefix, meta):
    open(f"{prefix}.json", "w").write(json.dumps(meta))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_writer_records_the_largest_id(tmp_path, dtype):
    rng = np.random.default_rng(0)
    top = min(int(np.iinfo(dtype).max), 70_000)
    docs = [rng.integers(0, top, size=int(n)) for n in rng.integers(0, 30, size=40)]
    with IndexedDatasetWriter(tmp_path / "x", dtype) as w:
        w.add_documents(docs[:10])
        w.add_flat(np.concatenate(docs[10:]), np.array([d.size for d in docs[10:]]))
    ds = IndexedDataset(tmp_path / "x")
    reference = max(int(d.max()) for d in docs if d.size)
    assert ds.metadata["max_token_id"] == ds.max_token_id == reference
    assert not (tmp_path / "x.max_token_id.json").exists()  # recorded: nothing to scan or cache
    assert IndexedDataset(write(tmp_path / "e", [[], []])).max_token_id == -1


def test_writer_refuses_ids_outside_the_vocabulary_it_is_told(tmp_path):
    with IndexedDatasetWriter(tmp_path / "v", np.uint16, metadata={"vocab_size": 100}) as w:
        w.add_document([0, 99])
        with pytest.raises(ValueError, match=r"token id 100 \(document 1 of the batch\) is outside the vocabulary: "
                                             "the metadata's vocab_size is 100"):
            w.add_flat(np.array([1, 2, 100]), np.array([1, 2]))
    assert IndexedDataset(tmp_path / "v").max_token_id == 99
    # The tokenizer identity's vocab_size counts too, and so does metadata given only at finalize.
    w = IndexedDatasetWriter(tmp_path / "t", np.uint16)
    w.add_document([7, 50])
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary: the metadata's tokenizer.vocab_size is 50"):
        w.finalize(metadata={"tokenizer": {"vocab_size": 50}})
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(("t", ".t"))) == []  # aborted: nothing left
    with pytest.raises(ValueError, match="metadata vocab_size must be a positive integer, got '5'"):
        IndexedDatasetWriter(tmp_path / "bad", np.uint16, metadata={"vocab_size": "5"})


def test_open_checks_the_recorded_value(tmp_path):
    prefix = write(tmp_path / "x", [[1, 2, 300]], metadata={"vocab_size": 301, "tokenizer": {"vocab_size": 301}})
    meta = sidecar(prefix)
    assert IndexedDataset(prefix).max_token_id == 300
    # A sidecar saying vocab_size 256 beside ids up to 300 (issue 10: 30522 accepted with ids up to 65535).
    set_sidecar(prefix, {**meta, "vocab_size": 256})
    with pytest.raises(IndexedDatasetError, match=r"x\.json: the largest token id is 300, but x\.json says "
                                                  "vocab_size 256: ids must be below it"):
        IndexedDataset(prefix)
    set_sidecar(prefix, {**meta, "tokenizer": {"vocab_size": 300}})
    with pytest.raises(IndexedDatasetError, match="says tokenizer.vocab_size 300"):
        IndexedDataset(prefix)
    for bad, why in ((-1, r"expected an integer in \[0, 65535\]"), (70000, "expected an integer"),
                     ("300", "expected an integer"), (None, "expected an integer"), (True, "expected an integer")):
        set_sidecar(prefix, {**meta, "max_token_id": bad})
        with pytest.raises(IndexedDatasetError, match=rf"x\.json: max_token_id is .* {why}"):
            IndexedDataset(prefix)
    empty = write(tmp_path / "e", [[]])
    set_sidecar(empty, {**sidecar(empty), "max_token_id": 0})
    with pytest.raises(IndexedDatasetError, match=r"max_token_id is 0, expected -1 \(no tokens\)"):
        IndexedDataset(empty)


def test_verify_rescans_the_bin(tmp_path):
    prefix = write(tmp_path / "x", [[1, 2, 3], [4]])
    with open(f"{prefix}.bin", "r+b") as f:  # a corrupt token: same size, so opening cannot tell
        f.seek(2)
        f.write(np.array([60_000], dtype=np.uint16).tobytes())
    ds = IndexedDataset(prefix)
    assert ds.max_token_id == 4  # the sidecar's value
    with pytest.raises(IndexedDatasetError, match=r"x\.bin: the largest token id is 60000, but .*x\.json records 4"):
        ds.verify()


def test_max_of_tokens_block_by_block():
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 64, 1000):
        a = rng.integers(0, 2**31 - 1, size=n).astype(np.int32)
        assert max_of_tokens(a, block=7) == (int(a.max()) if n else -1)


def test_prefix_without_sidecar_is_scanned_once_and_cached(tmp_path):
    prefix = write(tmp_path / "m", [[5, 9], [], [40_000, 3]])
    os.remove(f"{prefix}.json")  # as Megatron writes it
    cache = tmp_path / "m.max_token_id.json"
    ds = IndexedDataset(prefix)
    assert not cache.exists()  # opening does not scan
    assert ds.max_token_id == 40_000
    entry = json.loads(cache.read_text())
    assert entry["max_token_id"] == 40_000 and entry["idx_sha256"] == ds.idx_sha256
    # The cache is what a reopen reads: prove it by planting a different (still plausible) value under the same key.
    cache.write_text(json.dumps({**entry, "max_token_id": 41_000}))
    assert IndexedDataset(prefix).max_token_id == 41_000
    # A cache whose key no longer matches the files (the .bin rewritten in place) is ignored and replaced.
    with open(f"{prefix}.bin", "r+b") as f:
        f.write(np.array([50_000], dtype=np.uint16).tobytes())
    os.utime(f"{prefix}.bin", ns=(1, 1))
    assert IndexedDataset(prefix).max_token_id == 50_000
    assert json.loads(cache.read_text())["max_token_id"] == 50_000
    cache.write_text("{not json")
    assert IndexedDataset(prefix).max_token_id == 50_000


def test_cache_dir_and_unwritable_cache(tmp_path):
    prefix = write(tmp_path / "data" / "m", [[1, 2, 3]])
    os.remove(f"{prefix}.json")
    ds = IndexedDataset(prefix, cache_dir=tmp_path / "cache")
    assert ds.max_token_id == 3
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"max_token_id_{ds.idx_sha256[:32]}.json"]
    assert sorted(os.listdir(tmp_path / "data")) == ["m.bin", "m.idx"]
    # A cache location that cannot be written (here: below a regular file) costs a scan, not an error.
    (tmp_path / "afile").write_text("x")
    assert IndexedDataset(prefix, cache_dir=tmp_path / "afile" / "sub").max_token_id == 3


def test_format_1_sidecar_is_scanned_and_checked_against_its_vocabulary(tmp_path):
    prefix = write(tmp_path / "old", [[1, 2, 3000]])
    meta = sidecar(prefix)
    old = {k: v for k, v in meta.items() if k not in ("max_token_id", "files")}
    set_sidecar(prefix, {**old, "format_version": 1, "vocab_size": 3001})
    assert IndexedDataset(prefix).max_token_id == 3000
    os.remove(tmp_path / "old.max_token_id.json")
    set_sidecar(prefix, {**old, "format_version": 1, "vocab_size": 1000})
    ds = IndexedDataset(prefix)  # opening does not scan ...
    with pytest.raises(IndexedDatasetError, match=r"old\.bin: the largest token id is 3000, but old\.json says "
                                                  "vocab_size 1000"):
        _ = ds.max_token_id  # ... the first use does, and checks
    set_sidecar(prefix, {**old, "format_version": 3})
    with pytest.raises(IndexedDatasetError, match="format_version 3 is not one this reader knows"):
        IndexedDataset(prefix)


def test_float_dataset_has_no_token_ids(tmp_path):
    with IndexedDatasetWriter(tmp_path / "f", np.float32) as w:
        w.add_document(np.array([0.5, -2.0]))
    ds = IndexedDataset(tmp_path / "f")
    assert ds.metadata["max_token_id"] is None
    with pytest.raises(IndexedDatasetError, match="a float32 dataset holds no token ids"):
        _ = ds.max_token_id
