"""The rank-sliced, resumable batch loader (megasynth/data/loader.py)."""

import numpy as np
import pytest
import torch
from helpers import write_pattern_corpus

from megasynth.config import DataConfig
from megasynth.data.loader import (
    IGNORE_INDEX,
    DistributedBatchLoader,
    LoaderStateError,
    accumulation_steps,
    build_train_dataset,
    sample_range,
)

SEQ = 6


class CodedSamples:
    """Sample i holds tokens 1000 * i + [0..SEQ] (so every batch names its samples) and two documents."""

    def __init__(self, n: int, loss_mask: bool = False):
        self.n, self.loss_mask = n, loss_mask

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        sample = {"tokens": 1000 * i + np.arange(SEQ + 1, dtype=np.int64),
                  "doc_ids": np.array([0, 0, 0, 1, 1, 1, 1], dtype=np.int32)}
        if self.loss_mask:
            sample["loss_mask"] = np.array([1, 1, 0, 0, 1, 1, 1], dtype=np.uint8)
        return sample


def sample_ids(batch) -> list[int]:
    return (batch.input_ids[:, 0] // 1000).tolist()


def test_slices_are_disjoint_and_their_union_is_the_global_batch():
    g, mb, dp = 24, 2, 3
    accum = accumulation_steps(g, mb, dp)
    assert accum == 4
    for consumed in (0, 24, 48):
        seen = [i for m in range(accum) for r in range(dp)
                for i in sample_range(consumed, m, micro_batch_size=mb, dp_rank=r, dp_size=dp)]
        assert len(seen) == len(set(seen)) == g
        assert sorted(seen) == list(range(consumed, consumed + g))


def test_loaders_of_all_ranks_read_the_global_batch_once():
    ds = CodedSamples(48)
    loaders = [DistributedBatchLoader(ds, global_batch_size=12, micro_batch_size=2, dp_rank=r, dp_size=3)
               for r in range(3)]
    for step in range(4):
        per_rank = [[i for b in ld.next_step() for i in sample_ids(b)] for ld in loaders]
        flat = [i for ids in per_rank for i in ids]
        assert sorted(flat) == list(range(12 * step, 12 * step + 12))
        assert all(len(ids) == 4 for ids in per_rank)  # 2 micro-batches of 2 per rank
    # Tensor-parallel ranks of one dp group build the same loader (same dp_rank) and read the same data.
    a, b = (DistributedBatchLoader(ds, global_batch_size=12, micro_batch_size=2, dp_rank=1, dp_size=3)
            for _ in range(2))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.next_step(), b.next_step()))


def test_batch_tensors_are_shifted_and_masked():
    batch = DistributedBatchLoader(CodedSamples(4, loss_mask=True), global_batch_size=2,
                                   micro_batch_size=2).next_step()[0]
    assert batch.input_ids.tolist()[1] == [1000, 1001, 1002, 1003, 1004, 1005]
    # labels = tokens[1:]; loss_mask [1,1,0,0,1,1,1] removes the targets at token positions 2 and 3.
    assert batch.labels.tolist()[1] == [1001, IGNORE_INDEX, IGNORE_INDEX, 1004, 1005, 1006]
    assert batch.doc_ids.tolist()[0] == [0, 0, 0, 1, 1, 1] and batch.doc_ids.dtype == torch.int32
    assert batch.num_targets == 8
    unmasked = DistributedBatchLoader(CodedSamples(4), global_batch_size=2, micro_batch_size=2,
                                      document_masking=False).next_step()[0]
    assert unmasked.doc_ids is None and unmasked.num_targets == 12


def test_indivisible_batch_names_the_keys():
    with pytest.raises(ValueError, match=r"train.global_batch_size=10 .*train.micro_batch_size=4 x dp=1"):
        DistributedBatchLoader(CodedSamples(40), global_batch_size=10, micro_batch_size=4)


def test_state_dict_resumes_the_same_sequence_and_checks_the_fingerprint():
    ds = CodedSamples(64)
    make = lambda fp="blend-a": DistributedBatchLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=1,  # noqa: E731
                                                       dp_size=2, fingerprint=fp)
    straight = make()
    expected = [[sample_ids(b) for b in straight.next_step()] for _ in range(6)]
    first = make()
    for _ in range(2):
        first.next_step()
    state = first.state_dict()
    assert state == {"consumed_samples": 16, "fingerprint": "blend-a", "global_batch_size": 8}
    resumed = make()
    resumed.load_state_dict(state)
    assert [[sample_ids(b) for b in resumed.next_step()] for _ in range(4)] == expected[2:]

    other = make("blend-b")
    with pytest.raises(LoaderStateError, match="data.allow_blend_change"):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_fingerprint_change=True)
    assert other.consumed == 16


def test_reading_past_the_end_is_a_clear_error():
    loader = DistributedBatchLoader(CodedSamples(8), global_batch_size=8, micro_batch_size=4)
    loader.next_step()
    with pytest.raises(LoaderStateError, match="holds 8 samples"):
        loader.next_step()


def test_background_workers_read_the_same_batches():
    ds = CodedSamples(40, loss_mask=True)
    kw = {"global_batch_size": 8, "micro_batch_size": 2, "dp_rank": 1, "dp_size": 2}
    inline = DistributedBatchLoader(ds, **kw)
    workers = DistributedBatchLoader(ds, num_workers=2, **kw)
    workers.load_state_dict(inline.state_dict())
    for _ in range(3):
        for x, y in zip(inline.next_step(), workers.next_step()):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.doc_ids, y.doc_ids)
    # A resumed worker loader restarts its workers at the loaded position.
    inline.load_state_dict({"consumed_samples": 8, "fingerprint": ""})
    workers.load_state_dict({"consumed_samples": 8, "fingerprint": ""})
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(inline.next_step(), workers.next_step()))


def test_train_dataset_from_a_prefix(tmp_path):
    prefix = write_pattern_corpus(tmp_path / "train")
    data = DataConfig(data_path=prefix, seq_len=16)
    ds = build_train_dataset(data, num_samples=10, seed=1, cache_dir=tmp_path / "cache")
    assert len(ds) == 10 and ds[3]["tokens"].shape == (17,)
    again = build_train_dataset(data, num_samples=10, seed=1, cache_dir=tmp_path / "cache")
    reseeded = build_train_dataset(data, num_samples=10, seed=2, cache_dir=tmp_path / "cache")
    assert again.fingerprint == ds.fingerprint != reseeded.fingerprint
    assert np.array_equal(again[3]["tokens"], ds[3]["tokens"])
    with pytest.raises(ValueError, match="data.data_path"):
        build_train_dataset(DataConfig(seq_len=16), num_samples=10, seed=1, cache_dir=tmp_path / "cache")
