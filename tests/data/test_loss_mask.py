"""The loss-mask file PREFIX.mask: round trips of random masks against a numpy reference through every writer
call, the byte layout, windows across documents, validation on open and in verify(), and that .bin/.idx stay
the bytes Megatron-LM reads."""

import json
import os
import struct

import numpy as np
import pytest

import megasynth.data.indexed_writer as indexed_writer
from megasynth.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
)


def random_docs(seed, n=60, max_len=40, vocab=1000):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=int(k)) for k in rng.integers(0, max_len, size=n)]
    masks = [rng.random(d.size) < rng.random() for d in docs]  # per-document target density
    return docs, masks


def write_masked(prefix, docs, masks, how="document", dtype=np.uint16, metadata=None):
    with IndexedDatasetWriter(prefix, dtype, metadata=metadata, loss_mask=True) as w:
        if how == "document":
            for d, m in zip(docs, masks):
                w.add_document(d, loss_mask=m)
        elif how == "documents":
            w.add_documents(docs[:7], loss_masks=masks[:7])
            w.add_documents(docs[7:], loss_masks=masks[7:])
        else:  # flat batches of odd sizes, so the 8-bit packing carries bits across calls
            for a, b in ((0, 3), (3, 4), (4, 17), (17, len(docs))):
                part = docs[a:b]
                w.add_flat(np.concatenate(part) if part else np.empty(0, dtype=np.int64),
                           np.array([d.size for d in part], dtype=np.int64),
                           loss_mask=np.concatenate(masks[a:b]) if part else np.empty(0, dtype=bool))
    return str(prefix)


@pytest.mark.parametrize("how", ["document", "documents", "flat"])
def test_random_masks_round_trip(tmp_path, how):
    docs, masks = random_docs(seed=len(how))
    prefix = write_masked(tmp_path / "x", docs, masks, how)
    ds = IndexedDataset(prefix)
    assert ds.has_loss_mask
    for i, (d, m) in enumerate(zip(docs, masks)):
        got = ds.loss_mask(i)
        assert got.dtype == np.bool_ and got.shape == (d.size,)
        np.testing.assert_array_equal(got, m)
        np.testing.assert_array_equal(ds[i], d)
    stream = np.concatenate(masks)
    assert ds.metadata["loss_mask"]["num_targets"] == int(stream.sum())
    # Windows of one document, and of the whole stream across document boundaries, against the reference.
    rng = np.random.default_rng(5)
    for _ in range(200):
        i = int(rng.integers(len(docs)))
        n = docs[i].size
        off = int(rng.integers(0, n + 1))
        ln = int(rng.integers(0, n - off + 1))
        np.testing.assert_array_equal(ds.loss_mask_slice(i, off, ln), masks[i][off : off + ln])
        start = int(rng.integers(0, stream.size + 1))
        ln = int(rng.integers(0, stream.size - start + 1))
        np.testing.assert_array_equal(ds.loss_mask_tokens(start, ln), stream[start : start + ln])
    with pytest.raises(IndexError):
        ds.loss_mask_slice(0, 0, docs[0].size + 1)
    with pytest.raises(IndexError):
        ds.loss_mask_tokens(stream.size, 1)
    assert ds.verify() == ["the .bin's largest id matches the sidecar", "the loss mask's sha256 matches the sidecar"]


def test_file_layout_is_a_header_then_little_endian_bits(tmp_path):
    # 11 tokens: targets at stream positions 1, 2, 8, 10. Byte 0 holds tokens 0..7 (bit k = token k).
    prefix = tmp_path / "g"
    with IndexedDatasetWriter(prefix, np.uint16, loss_mask=True) as w:
        w.add_document([5, 6, 7], loss_mask=np.array([0, 1, 1]))
        w.add_document([], loss_mask=np.array([], dtype=bool))
        w.add_document([1, 2, 3, 4, 5, 6, 7, 8], loss_mask=np.array([0, 0, 0, 0, 0, 1, 0, 1], dtype=bool))
    raw = open(f"{prefix}.mask", "rb").read()
    assert raw == b"MSLMASK\x00" + struct.pack("<QQ", 1, 11) + bytes([0b00000110, 0b00000101])
    entry = IndexedDataset(prefix).metadata["loss_mask"]
    assert entry["file"] == "g.mask" and entry["encoding"] == "bits-le" and entry["size"] == 26
    assert entry["num_targets"] == 4


def test_bin_and_idx_are_the_same_bytes_with_or_without_a_mask(tmp_path):
    # So Megatron-LM (and every existing reader) reads a masked prefix's tokens unchanged.
    docs, masks = random_docs(seed=3)
    write_masked(tmp_path / "m", docs, masks)
    with IndexedDatasetWriter(tmp_path / "u", np.uint16) as w:
        w.add_documents(docs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"u{ext}").read_bytes()
    assert not IndexedDataset(tmp_path / "u").has_loss_mask


def test_writer_requires_the_mask_iff_created_with_it(tmp_path):
    with IndexedDatasetWriter(tmp_path / "m", np.uint16, loss_mask=True) as w:
        with pytest.raises(ValueError, match="created with loss_mask=True, so add_document needs loss_mask="):
            w.add_document([1, 2])
        with pytest.raises(ValueError, match="add_flat needs loss_mask="):
            w.add_flat(np.array([1, 2]), np.array([2]))
        with pytest.raises(ValueError, match="add_documents needs loss_mask="):
            w.add_documents([[1]])
        with pytest.raises(ValueError, match=r"loss_mask must be a 1-D array of 2 entries .* got shape \(3,\)"):
            w.add_document([1, 2], loss_mask=np.array([True, False, True]))
        with pytest.raises(ValueError, match=r"booleans \(or integers 0/1\), got dtype int64 with values in \[0, 2\]"):
            w.add_document([1, 2], loss_mask=np.array([0, 2]))
        with pytest.raises(ValueError, match="2 loss masks for 1 documents"):
            w.add_documents([[1]], loss_masks=[[True], [False]])
        w.add_document([3], loss_mask=np.array([1]))  # integers 0/1 are accepted
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == [[3]]  # rejected calls wrote nothing
    assert ds.loss_mask(0).tolist() == [True]
    with IndexedDatasetWriter(tmp_path / "u", np.uint16) as w:
        with pytest.raises(ValueError, match="got a loss mask, but this writer stores none"):
            w.add_document([1], loss_mask=np.array([True]))
        w.add_document([1])
    ds = IndexedDataset(tmp_path / "u")
    with pytest.raises(IndexedDatasetError, match="has no loss mask"):
        ds.loss_mask(0)
    with pytest.raises(IndexedDatasetError, match="has no loss mask"):
        ds.loss_mask_slice(0, 0, 1)


def test_empty_masked_prefix(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16, loss_mask=True):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert ds.has_loss_mask and len(ds) == 0 and ds.max_token_id == -1
    assert os.path.getsize(tmp_path / "e.mask") == 24


def test_writer_buffers_do_not_change_the_bits(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_writer, "_CHUNK", 3)  # tiny length chunks: flushing must not disturb the mask
    docs, masks = random_docs(seed=9, n=25)
    ds = IndexedDataset(write_masked(tmp_path / "x", docs, masks, "flat"))
    np.testing.assert_array_equal(ds.loss_mask_tokens(0, ds.num_tokens), np.concatenate(masks))


@pytest.fixture
def masked(tmp_path):
    docs, masks = random_docs(seed=11, n=20)
    return write_masked(tmp_path / "c", docs, masks)


def _sidecar(prefix):
    return json.loads(open(f"{prefix}.json").read())


def _set_sidecar(prefix, meta):
    open(f"{prefix}.json", "w").write(json.dumps(meta))


def test_open_refuses_a_mask_that_does_not_fit(masked):
    path = f"{masked}.mask"
    good = open(path, "rb").read()
    meta = _sidecar(masked)

    os.truncate(path, len(good) - 1)
    with pytest.raises(IndexedDatasetError, match=rf"c\.mask: {len(good) - 1} bytes, but .*c\.json records {len(good)}"):
        IndexedDataset(masked)
    open(path, "wb").write(b"NOTAMASK" + good[8:])
    with pytest.raises(IndexedDatasetError, match=r"c\.mask: not a loss-mask file"):
        IndexedDataset(masked)
    open(path, "wb").write(good[:16] + struct.pack("<Q", 5) + good[24:])
    with pytest.raises(IndexedDatasetError, match=r"c\.mask: header says 5 tokens, the \.bin holds"):
        IndexedDataset(masked)
    os.remove(path)
    with pytest.raises(IndexedDatasetError, match=r"c\.mask: no such file, but .*c\.json lists a loss mask"):
        IndexedDataset(masked)
    open(path, "wb").write(good)
    _set_sidecar(masked, {**meta, "loss_mask": {**meta["loss_mask"], "encoding": "spans"}})
    with pytest.raises(IndexedDatasetError, match="loss_mask.encoding 'spans' is not supported"):
        IndexedDataset(masked)
    # A mask the sidecar does not list (left by something else) is stale: refused, not ignored.
    _set_sidecar(masked, {k: v for k, v in meta.items() if k != "loss_mask"})
    with pytest.raises(IndexedDatasetError, match=r"c\.mask: a loss mask that .*c\.json does not list"):
        IndexedDataset(masked)
    os.remove(f"{masked}.json")
    with pytest.raises(IndexedDatasetError, match=r"does not list \(no sidecar\)"):
        IndexedDataset(masked)
    _set_sidecar(masked, meta)
    assert IndexedDataset(masked).has_loss_mask


def test_verify_finds_a_flipped_bit_that_open_does_not(masked):
    path = f"{masked}.mask"
    raw = bytearray(open(path, "rb").read())
    raw[30] ^= 0b100
    open(path, "wb").write(bytes(raw))
    ds = IndexedDataset(masked)  # same size and header: opening stays cheap and does not hash
    with pytest.raises(IndexedDatasetError, match=r"c\.mask: sha256 .* differs from the sidecar's"):
        ds.verify()
