"""The indexed format: round trips, a hand-written golden .idx, validation errors, atomic and streaming writes,
flat batches (add_flat), byte compatibility with Megatron-LM's reader and writer, merging and length statistics."""

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest

import megasynth.data.indexed_writer as indexed_writer
import megasynth.data.merge as merge
from megasynth.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    prefix_exists,
    smallest_token_dtype,
)
from megasynth.data.merge import length_histogram, length_summary, merge_datasets


def write(prefix, docs, dtype=np.uint16, metadata=None):
    with IndexedDatasetWriter(prefix, dtype, metadata=metadata) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def contents(ds):
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def megatron():
    """Megatron-LM's own reader and builder (megatron-core, a dev dependency); importing it takes seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that Transformer Engine and Apex are absent
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_smallest_token_dtype_boundary():
    # ids are 0..vocab_size-1: 65536 ids still fit uint16, one more needs int32
    assert smallest_token_dtype(65536) == np.uint16
    assert smallest_token_dtype(65537) == np.int32
    assert smallest_token_dtype(1) == np.uint16
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            smallest_token_dtype(bad)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = DTYPE_CODES[code]
    rng = np.random.default_rng(code)
    hi = int(np.iinfo(dtype).max) if dtype.kind in "iu" else 1000
    docs = [rng.integers(0, hi, size=n, endpoint=True) for n in (5, 0, 1, 17, 0, 3)]
    docs[0][0] = hi  # the largest representable id must survive
    if dtype.kind == "f":
        docs = [d.astype(np.float64) + 0.25 for d in docs]
    w = IndexedDatasetWriter(tmp_path / "x", dtype, metadata={"note": "t"})
    w.add_documents(docs[:3])
    for d in docs[3:]:
        w.add_document(d)
    assert (w.num_documents, w.num_tokens) == (6, 26)
    sidecar = w.finalize()
    ds = IndexedDataset(tmp_path / "x")
    assert ds.dtype == dtype and len(ds) == 6 and ds.num_tokens == 26
    for got, want in zip([ds[i] for i in range(len(ds))], docs):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want.astype(dtype))
    assert ds.metadata == sidecar == json.loads((tmp_path / "x.json").read_text())
    assert sidecar["dtype"] == dtype.name and sidecar["note"] == "t" and sidecar["num_tokens"] == 26
    assert ds.sequence_lengths.tolist() == [5, 0, 1, 17, 0, 3]
    assert ds.document_indices.tolist() == list(range(7))
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs).astype(dtype))


def test_items_are_readonly_views(tmp_path):
    ds = IndexedDataset(write(tmp_path / "x", [[1, 2, 3], [4, 5], [6]]))
    item = ds[1]
    assert np.shares_memory(item, ds.tokens) and not item.flags.writeable
    assert ds[-1].tolist() == [6] and ds[np.int64(0)].tolist() == [1, 2, 3]
    assert ds.get(0, 1).tolist() == [2, 3] and ds.get(0, 1, 1).tolist() == [2] and ds.get(1, 2).tolist() == []
    assert np.shares_memory(ds.get(0, 1, 2), ds.tokens)
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(IndexError, match="out of range"):
        ds.get(0, 2, 2)
    with pytest.raises(TypeError):
        ds[1.0]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers under spawn get a reopened copy
    assert contents(clone) == contents(ds)


def test_golden_idx_written_by_hand(tmp_path):
    docs = [[5, 6, 7], [], [65535], [1, 2]]
    write(tmp_path / "g", docs, np.uint16)
    # From the spec: magic, version <Q, dtype code <B (8 = uint16), sequence count <Q, document count <Q (S + 1),
    # int32 lengths, int64 byte pointers (uint16 = 2 bytes a token), int64 document indices 0..S.
    expected = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 4) + struct.pack("<Q", 5)
    expected += struct.pack("<4i", 3, 0, 1, 2)
    expected += struct.pack("<4q", 0, 6, 6, 8)
    expected += struct.pack("<5q", 0, 1, 2, 3, 4)
    assert (tmp_path / "g.idx").read_bytes() == expected
    assert (tmp_path / "g.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 65535, 1, 2)


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    w.add_document([1, 2])
    with pytest.raises(ValueError, match="token id 65536 .*does not fit uint16"):
        w.add_document([3, 65536])
    with pytest.raises(ValueError, match="token id -1"):
        w.add_document(np.array([-1], dtype=np.int64))
    with pytest.raises(ValueError, match="document 2 of the batch"):
        w.add_documents([np.array([1]), np.array([2]), np.array([70000])])
    with pytest.raises(ValueError, match="integers"):
        w.add_document([1.5])
    with pytest.raises(ValueError, match="1-D"):
        w.add_document([[1, 2]])
    w.add_document([9])
    w.finalize()
    # Rejected documents wrote nothing: the prefix holds exactly the accepted ones.
    assert contents(IndexedDataset(tmp_path / "x")) == [[1, 2], [9]]
    with pytest.raises(RuntimeError, match="finalized"):
        w.add_document([1])
    w8 = IndexedDatasetWriter(tmp_path / "y", np.int8)
    with pytest.raises(ValueError, match="token id -3"):  # signed dtypes still refuse negative ids
        w8.add_document(np.array([-3], dtype=np.int8))
    with pytest.raises(ValueError, match="int8"):
        w8.add_document([128])
    w8.abort()
    with pytest.raises(ValueError, match="computes these keys"):
        IndexedDatasetWriter(tmp_path / "z", np.uint16, metadata={"num_tokens": 3})
    with pytest.raises(ValueError, match="no code"):
        IndexedDatasetWriter(tmp_path / "z", np.uint32)


def _flat(docs):
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return np.concatenate([np.asarray(d, dtype=np.int64) for d in docs] + [np.empty(0, np.int64)]), lengths


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_add_flat_is_byte_identical_to_add_document(tmp_path, dtype):
    rng = np.random.default_rng(3)
    hi = int(np.iinfo(dtype).max)
    # Empty documents first, in a run in the middle and last: the places where offsets go wrong.
    sizes = [0, 3, 1, 0, 0, 7, 2, 0, 5, 1, 0]
    docs = [rng.integers(0, hi, size=n, endpoint=True) for n in sizes]
    docs[1][0] = hi  # the largest id survives
    meta = {"note": "same"}
    write(tmp_path / "one_by_one", docs, dtype, metadata=meta)
    with IndexedDatasetWriter(tmp_path / "flat", dtype, metadata=meta) as w:
        # Batches of uneven size, an empty batch, and int64 ids that are cast on the way (the usual case).
        for lo, hi_ in ((0, 4), (4, 4), (4, 5), (5, 11)):
            tokens, lengths = _flat(docs[lo:hi_])
            w.add_flat(tokens, lengths)
        w.add_flat([], [])
        assert (w.num_documents, w.num_tokens) == (len(docs), sum(sizes))
    with IndexedDatasetWriter(tmp_path / "one_batch", dtype, metadata=meta) as w:
        tokens, lengths = _flat(docs)
        w.add_flat(tokens.astype(dtype), lengths.astype(np.int32))  # already the target dtype; int32 lengths
    for other in ("flat", "one_batch"):
        for ext in (".bin", ".idx", ".json"):
            assert (tmp_path / f"one_by_one{ext}").read_bytes() == (tmp_path / f"{other}{ext}").read_bytes()
    assert contents(IndexedDataset(tmp_path / "flat")) == [d.tolist() for d in docs]


def test_add_flat_rejects_bad_batches_and_writes_nothing_for_them(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    w.add_flat(np.array([1, 2, 3]), np.array([2, 1]))
    bad = [
        # (tokens, lengths, message)
        (np.array([1, 2, 3]), np.array([2, 2]), "lengths sum to 4 tokens but the flat tokens array holds 3"),
        (np.array([1, 2, 3]), np.array([1, 1]), "lengths sum to 2 tokens but the flat tokens array holds 3"),
        (np.array([1, 2]), np.array([3, -1]), "document 1 has negative length -1"),
        (np.array([1, 2]), np.array([1.0, 1.0]), "lengths must be integers, got dtype float64"),
        (np.array([1, 2]), np.array([[1, 1]]), "lengths must be a 1-D array"),
        (np.array([[1, 2]]), np.array([2]), "tokens must be a 1-D array"),
        (np.array([1.0, 2.0]), np.array([2]), "token ids must be integers"),
        # ids that do not fit: the message names the document in the batch, empty documents counted
        (np.array([1, 2, 65536, 4]), np.array([2, 0, 2]), r"token id 65536 \(document 2 of the batch\) does not fit"),
        (np.array([1, -7, 3]), np.array([2, 0, 1]), r"token id -7 \(document 0 of the batch\)"),
        # the .idx stores lengths as int32; checked on the lengths alone, before any token is looked at
        (np.empty(0, np.uint16), np.array([2**31], dtype=np.uint64), "document 0 has 2147483648 tokens"),
    ]
    for tokens, lengths, message in bad:
        with pytest.raises(ValueError, match=message):
            w.add_flat(tokens, lengths)
        assert (w.num_documents, w.num_tokens) == (2, 3)
    w.add_flat(np.array([9], dtype=np.uint16), np.array([1], dtype=np.uint8))
    w.finalize()
    assert contents(IndexedDataset(tmp_path / "x")) == [[1, 2], [3], [9]]  # only the accepted batches
    with pytest.raises(RuntimeError, match="finalized"):
        w.add_flat(np.array([1]), np.array([1]))


def test_exception_aborts_and_keeps_existing_prefix(tmp_path):
    write(tmp_path / "x", [[1, 2]], metadata={"v": 1})
    with pytest.raises(ZeroDivisionError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16, metadata={"v": 2}) as w:
            w.add_document([7, 8, 9])
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx", "x.json"]  # no temp files left
    ds = IndexedDataset(tmp_path / "x")
    assert contents(ds) == [[1, 2]] and ds.metadata["v"] == 1
    with pytest.raises(ValueError, match="JSON-serializable"):
        IndexedDatasetWriter(tmp_path / "y", np.uint16, metadata={"bad": object()}).finalize()
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx", "x.json"]
    write(tmp_path / "x", [[3], [4]], metadata={"v": 3})  # a successful overwrite replaces all three files
    ds = IndexedDataset(tmp_path / "x")
    assert contents(ds) == [[3], [4]] and ds.metadata["v"] == 3


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from megasynth.data.indexed import IndexedDatasetWriter
    prefix, when = sys.argv[1], sys.argv[2]
    real_replace = os.replace
    def replace_then_die(src, dst):
        real_replace(src, dst)
        if when == "after-bin-rename":  # the worst moment: new .bin in place, .idx not yet
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    w = IndexedDatasetWriter(prefix, np.uint16)
    for i in range(1000):
        w.add_document(np.arange(i % 50, dtype=np.uint16))
        if when == "mid-write" and i == 500:
            w._bin.flush()
            print("ready", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    w.finalize()
""")


@pytest.mark.parametrize("when", ["mid-write", "after-bin-rename"])
@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_never_leaves_a_prefix_that_opens(tmp_path, when, existing):
    prefix = tmp_path / "x"
    if existing:  # overwriting a valid prefix must not end as "old index over new tokens"
        write(prefix, [list(range(7))] * 3)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(prefix), when], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if existing and when == "mid-write":  # killed before finalize touched anything: the old prefix is intact
        assert contents(IndexedDataset(prefix)) == [list(range(7))] * 3
    else:
        # After the .bin rename the old .idx is already gone (finalize removes it first), so nothing opens.
        assert not prefix_exists(prefix)
        with pytest.raises(IndexedDatasetError, match="no such file"):
            IndexedDataset(prefix)


@pytest.mark.parametrize("method", ["add_documents", "add_flat"])
def test_writer_memory_does_not_grow_with_documents(tmp_path, monkeypatch, method):
    # Smaller chunks keep the test fast; the writer's buffers are sized by _CHUNK, never by the document count.
    monkeypatch.setattr(indexed_writer, "_CHUNK", 1 << 16)
    batch = [np.array([7], dtype=np.uint16)] * 20_000
    flat, lengths = np.full(20_000, 7, dtype=np.uint16), np.ones(20_000, dtype=np.int64)
    tracemalloc.start()
    try:
        with IndexedDatasetWriter(tmp_path / "big", np.uint16) as w:
            for _ in range(100):
                if method == "add_flat":
                    w.add_flat(flat, lengths)
                else:
                    w.add_documents(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ds = IndexedDataset(tmp_path / "big")
    assert len(ds) == 2_000_000 and ds.num_tokens == 2_000_000
    assert int(ds.sequence_pointers[-1]) == 2 * 1_999_999 and int(ds.document_indices[-1]) == 2_000_000
    # Holding the index of 2M documents would take >= 40 MB (int32 length + int64 pointer + int64 document index
    # each); the writer needs its 8 MiB .bin write buffer plus a few 64k-entry chunks (< 2 MiB).
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def _corrupt(prefix, path_suffix, offset, data):
    path = f"{prefix}{path_suffix}"
    raw = bytearray(open(path, "rb").read())
    raw[offset : offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "c", [[1, 2, 3], [4], [5, 6]], np.uint16)


def test_truncated_idx(good):
    size = os.path.getsize(f"{good}.idx")  # 34 + 3 * 12 + 4 * 8 = 102
    assert size == 102
    os.truncate(f"{good}.idx", 90)
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: truncated: expected 102 bytes, found 90"):
        IndexedDataset(good)
    os.truncate(f"{good}.idx", 20)
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: truncated: expected at least 34 bytes, found 20"):
        IndexedDataset(good)


def test_truncated_and_oversized_bin(good):
    os.truncate(f"{good}.bin", 8)
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: sequence 2 .* is beyond the \.bin"):
        IndexedDataset(good)
    os.truncate(f"{good}.bin", 14)
    with pytest.raises(IndexedDatasetError, match=r"c\.bin: expected 12 bytes .* found 14"):
        IndexedDataset(good)


def test_truncated_bin_tail(tmp_path):
    # The last sequence's pointer lies inside the .bin but its tokens run past the end.
    prefix = write(tmp_path / "t", [[1, 2, 3], [4, 5, 6, 7]])
    os.truncate(f"{prefix}.bin", 12)
    with pytest.raises(IndexedDatasetError, match=r"beyond the \.bin .*12 bytes"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    "where, offset, data, message",
    [
        (".idx", 0, b"NOTMMIDX\x00", "not a Megatron indexed dataset"),
        (".idx", 9, struct.pack("<Q", 2), "unsupported version 2"),
        (".idx", 17, struct.pack("<B", 9), "unknown dtype code 9"),
        (".idx", 34 + 12 + 8, struct.pack("<q", 1000), "sequence 1 .*byte pointer 1000.* beyond the .bin"),
        (".idx", 34 + 12 + 8, struct.pack("<q", 4), "sequence 1 has byte pointer 4, expected 6"),
        (".idx", 34 + 4, struct.pack("<i", -1), "sequence 1 has negative length -1"),
        (".idx", 34 + 36, struct.pack("<q", 1), "document indices must start with 0"),
        (".idx", 34 + 36 + 8, struct.pack("<q", 3), "document indices decrease at entry 2"),
        (".idx", 34 + 36 + 24, struct.pack("<q", 2), "last document index is 2, expected the sequence count 3"),
    ],
    ids=["magic", "version", "dtype", "pointer-beyond", "pointer-gap", "negative-length", "doc-start", "doc-order", "doc-end"],
)
def test_corrupt_idx(good, where, offset, data, message):
    # Layout of the 3-sequence .idx: header 34 B, lengths at 34, pointers at 46, document indices at 70.
    _corrupt(good, where, offset, data)
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: .*" + message):
        IndexedDataset(good)


def test_missing_files_and_bad_sidecars(good, tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"nope\.idx: no such file"):
        IndexedDataset(tmp_path / "nope")
    side = f"{good}.json"
    meta = json.loads(open(side).read())
    open(side, "w").write(json.dumps({**meta, "num_tokens": 7}))
    with pytest.raises(IndexedDatasetError, match=r'c\.json: field "num_tokens" is 7 but the binary has 6'):
        IndexedDataset(good)
    open(side, "w").write('{\n  "format": "megasynth-indexed",\n  oops\n}')
    with pytest.raises(IndexedDatasetError, match=r"c\.json:3: invalid JSON"):
        IndexedDataset(good)
    open(side, "w").write("[1, 2]")
    with pytest.raises(IndexedDatasetError, match="not a megasynth-indexed sidecar"):
        IndexedDataset(good)
    os.remove(side)
    assert IndexedDataset(good).metadata is None  # no sidecar is fine (Megatron's files have none)
    os.remove(f"{good}.bin")
    assert not prefix_exists(good)
    with pytest.raises(IndexedDatasetError, match=r"c\.bin: no such file"):
        IndexedDataset(good)


def test_our_files_open_in_megatron(tmp_path, megatron):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50_000, size=int(n)) for n in rng.integers(0, 40, size=60)]
    for dtype in (np.uint16, np.int32):
        prefix = str(tmp_path / f"ours_{np.dtype(dtype).name}")
        with IndexedDatasetWriter(prefix, dtype) as w:
            w.add_documents(docs)
        theirs = megatron.IndexedDataset(prefix)
        ours = IndexedDataset(prefix)
        assert len(theirs) == len(ours) == 60
        np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
        np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
        np.testing.assert_array_equal(theirs.index.sequence_pointers, ours.sequence_pointers)
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(theirs[i], d)
            assert theirs[i].dtype == dtype
        longest = int(np.argmax([d.size for d in docs]))
        np.testing.assert_array_equal(theirs.get(longest, offset=1, length=2), ours.get(longest, 1, 2))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Megatron's builder calls numpy.array(tensor, copy=...)
def test_megatron_files_open_in_ours_byte_identical(tmp_path, megatron):
    import torch  # noqa: PLC0415 - Megatron's builder takes tensors

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 60_000, size=int(n)) for n in rng.integers(0, 30, size=40)]
    prefix = str(tmp_path / "theirs")
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    ds = IndexedDataset(prefix)
    assert ds.metadata is None and ds.dtype == np.uint16
    assert contents(ds) == [d.tolist() for d in docs]
    # One document per sequence: our writer produces the very same bytes.
    write(tmp_path / "ours", docs)
    for ext in (".bin", ".idx"):
        assert open(f"{prefix}{ext}", "rb").read() == open(tmp_path / f"ours{ext}", "rb").read()
    # Megatron can also group several sequences into one document; the reader keeps that grouping.
    multi = str(tmp_path / "multi")
    builder = megatron.IndexedDatasetBuilder(f"{multi}.bin", dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), lengths=[2, 3])
    builder.add_document(torch.tensor([6]), lengths=[1])
    builder.finalize(f"{multi}.idx")
    ds = IndexedDataset(multi)
    assert contents(ds) == [[1, 2], [3, 4, 5], [6]]
    assert ds.document_indices.tolist() == [0, 2, 3] and ds.num_documents == 2


def test_merge(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 1000, size=int(n)).tolist() for n in rng.integers(0, 12, size=40)]
    tok = {"kind": "sentencepiece", "sha256": "abc"}
    parts = [
        write(tmp_path / f"p{k}", docs[k * 15 : (k + 1) * 15], metadata={"tokenizer": tok, "vocab_size": 1000,
                                                                          "sources": [{"path": f"s{k}.jsonl"}]})
        for k in range(3)
    ]
    empty = write(tmp_path / "empty", [])
    # Tiny copy runs so the merge crosses run boundaries inside every input.
    monkeypatch.setattr(merge, "_MERGE_TOKENS", 7)
    monkeypatch.setattr(merge, "_MERGE_SEQUENCES", 4)
    monkeypatch.setattr(indexed_writer, "_CHUNK", 4)  # and the writer's length buffer fills and flushes repeatedly
    sidecar = merge_datasets([parts[0], empty, parts[1], parts[2]], tmp_path / "m")
    ds = IndexedDataset(tmp_path / "m")
    assert contents(ds) == docs
    assert ds.metadata == sidecar and sidecar["tokenizer"] == tok and sidecar["vocab_size"] == 1000
    assert sidecar["sources"] == [{"path": f"s{k}.jsonl"} for k in range(3)]
    assert [e["num_documents"] for e in sidecar["inputs"]] == [15, 0, 15, 10]
    assert [e["prefix"] for e in sidecar["inputs"]] == [parts[0], empty, parts[1], parts[2]]
    assert sidecar["num_tokens"] == sum(map(len, docs)) and sidecar["created_by"] == "merge_datasets"

    other_tok = write(tmp_path / "o", [[1]], metadata={"tokenizer": {"sha256": "zzz"}})
    with pytest.raises(IndexedDatasetError, match="tokenizer hash 'zzz' differs"):
        merge_datasets([parts[0], other_tok], tmp_path / "bad")
    wide = write(tmp_path / "w", [[1]], dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype int32 differs"):
        merge_datasets([parts[0], wide], tmp_path / "bad")
    with pytest.raises(ValueError, match="the output would overwrite the input prefixes"):
        merge_datasets([parts[0], parts[1]], parts[1])
    assert not prefix_exists(tmp_path / "bad")


def test_length_summary_and_histogram():
    lengths = np.array([0, 1, 2, 3, 4, 7, 8, 1000, 1023, 1024])
    s = length_summary(lengths)
    assert (s["count"], s["min"], s["max"]) == (10, 0, 1024)
    assert s["mean"] == pytest.approx(sum(lengths.tolist()) / 10)
    assert s["median"] == 5.5 and s["p99"] == pytest.approx(np.percentile(lengths, 99))
    hist = length_histogram(lengths)
    # Reference by bit length: 0 -> bucket 0, n -> [2**(b-1), 2**b) with b = n.bit_length()
    ref = {}
    for n in lengths.tolist():
        ref[n.bit_length()] = ref.get(n.bit_length(), 0) + 1
    assert [(lo, hi) for lo, hi, _ in hist][:3] == [(0, 1), (1, 2), (2, 4)]
    assert {k: c for k, (_, _, c) in enumerate(hist) if c} == ref
    assert length_histogram([]) == [] and length_summary([])["count"] == 0


def test_index_hash_is_reused_for_the_same_file_only(tmp_path, monkeypatch):
    """The .idx sha256 (checked against the sidecar at every open) is hashed once per file per process: reopening
    and pickled copies (DataLoader workers, which may not inherit the memo) reuse it; a rewritten index (another
    mtime or inode) is hashed again, so a stale value is never trusted."""
    import megasynth.data.indexed as indexed
    from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter, idx_path

    memo: dict = {}
    monkeypatch.setattr(indexed, "_IDX_SHA256", memo)
    prefix = tmp_path / "p"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.finalize()
    ds = IndexedDataset(prefix)  # the sidecar check hashes the .idx
    sha = ds.idx_sha256
    assert list(memo.values()) == [sha]
    identity = next(iter(memo))
    memo[identity] = "f" * 64  # a memo hit must be used as is: opening now sees a "mismatched" sidecar
    with pytest.raises(IndexedDatasetError, match="different"):
        IndexedDataset(prefix)
    memo[identity] = sha

    state = pickle.dumps(ds)
    memo.clear()  # a spawned worker starts with an empty memo
    copy = pickle.loads(state)
    assert memo == {identity: sha} and copy.idx_sha256 == sha and list(copy[0]) == [1, 2, 3]

    memo[identity] = "0" * 64  # stale: the file changes below, so this entry no longer applies
    st = os.stat(idx_path(prefix))
    os.utime(idx_path(prefix), ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert IndexedDataset(prefix).idx_sha256 == sha  # rehashed under its new identity
