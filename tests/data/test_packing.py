"""Packed SFT samples (megasynth/data/packed_dataset.py): whole examples per window, padding, truncation, masks,
isolation of packed examples in the model, the masked loss against a float64 reference, and blends that mix a
packed masked source with a concatenated unmasked one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megasynth.config import DataSource, ModelConfig
from megasynth.data.blend import build_blended_dataset
from megasynth.data.gpt_dataset import GPTDataset
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.data.loader import IGNORE_INDEX, collate_samples
from megasynth.data.packed_dataset import PackedDataset, best_fit_decreasing
from megasynth.model import build_model

SEQ = 31  # windows of 32 tokens
PAD = 0
VOCAB = 97


def make_examples(num=40, seed=0, max_len=24, long=()):
    """Examples of random lengths (ids 1..VOCAB-1, so padding is recognisable), with a mask: a prompt of
    random length (False) then the response (True). `long` adds examples of those lengths."""
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(2, max_len + 1, size=num)) + list(long)
    examples = []
    for n in lengths:
        tokens = rng.integers(1, VOCAB, size=int(n))
        mask = np.zeros(int(n), dtype=bool)
        mask[int(rng.integers(1, n)):] = True
        examples.append((tokens, mask))
    return examples


def write_masked(prefix, examples):
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"vocab_size": VOCAB, "eod_id": PAD},
                              loss_mask=True) as w:
        for tokens, mask in examples:
            w.add_document(tokens, loss_mask=mask)
    return str(prefix)


def write_plain(prefix, examples):
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"vocab_size": VOCAB, "eod_id": PAD}) as w:
        w.add_documents([t for t, _ in examples])
    return str(prefix)


def segments(item):
    """[(tokens, mask, segment id)] of the window's segments, in order."""
    ids = item["doc_ids"]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    return [(t, m, int(d[0])) for t, m, d in zip(np.split(item["tokens"], cuts), np.split(item["loss_mask"], cuts),
                                                  np.split(ids, cuts))]


# ----------------------------------------------------------------------------------------------- the packer


def bfd_reference(lengths, capacity):
    """Best-fit decreasing, written the obvious way: O(n * bins)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    free, bin_of = [], {}
    for i in order:
        fits = [(space, b) for b, space in enumerate(free) if space >= lengths[i]]
        if fits:
            space = min(s for s, _ in fits)
            b = [b for s, b in fits if s == space]
            b = b[-1]  # the packer reuses the most recently filled bin among equals (a stack)
        else:
            free.append(capacity)
            b = len(free) - 1
        free[b] -= lengths[i]
        bin_of[i] = b
    return bin_of, len(free)


@pytest.mark.parametrize("seed", range(4))
def test_best_fit_decreasing_packs_every_item_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 33, size=300)
    items, starts = best_fit_decreasing(lengths, 32)
    assert sorted(items.tolist()) == list(range(300))
    sums = np.add.reduceat(lengths[items], starts[:-1])
    assert (sums <= 32).all() and (np.diff(starts) > 0).all()
    _, ref_bins = bfd_reference(lengths.tolist(), 32)
    assert starts.size - 1 == ref_bins
    # The lower bound: no packing uses fewer bins than total / capacity.
    assert starts.size - 1 >= -(-lengths.sum() // 32)


def test_best_fit_decreasing_refuses_items_that_do_not_fit():
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        best_fit_decreasing(np.array([3, 9]), 8)


# ----------------------------------------------------------------------------------------------- the dataset


@pytest.fixture
def masked(tmp_path):
    examples = make_examples(long=(SEQ + 10,))
    return examples, write_masked(tmp_path / "sft", examples)


def test_examples_are_whole_padded_masked_and_positions_restart(masked, tmp_path):
    examples, prefix = masked
    ds = IndexedDataset(prefix)
    assert ds.has_loss_mask
    packed = PackedDataset(ds, seq_len=SEQ, num_samples=60, seed=3, cache_dir=tmp_path / "cache", name="sft")
    assert packed.num_epochs >= 2
    per_epoch = packed.windows_per_epoch
    seen = []
    for i in range(packed.num_samples):
        item = packed[i]
        assert item["tokens"].shape == item["doc_ids"].shape == item["loss_mask"].shape == (SEQ + 1,)
        assert (np.diff(item["doc_ids"]) >= 0).all()
        examples_in = packed.window_examples(i).tolist()
        segs = segments(item)
        real = segs[: len(examples_in)]
        for (tokens, mask, _), doc in zip(real, examples_in):
            want_tokens, want_mask = examples[doc]
            n = min(len(want_tokens), SEQ + 1)
            np.testing.assert_array_equal(tokens, want_tokens[:n])  # whole (or, if too long, its first window)
            np.testing.assert_array_equal(mask[1:], want_mask[1:n])  # the prefix's mask, carried
            assert not mask[0]  # nothing in its own segment predicts an example's first token
        pad = segs[len(examples_in):]
        assert len(pad) <= 1
        if pad:  # the tail: pad ids in a segment of their own, never a target
            tokens, mask, seg = pad[0]
            assert (tokens == PAD).all() and not mask.any() and seg == len(examples_in)
        seen.append((int(packed.shuffle[i]) // per_epoch, examples_in))
    # Over the windows of epoch 0 that were drawn, no example appears twice (none is split across windows).
    first = [d for epoch, docs in seen if epoch == 0 for d in docs]
    assert len(first) == len(set(first))
    # Positions restart at every segment (what the model derives from doc_ids).
    from megasynth.model import positions_from_doc_ids

    item = packed[0]
    pos = positions_from_doc_ids(torch.from_numpy(item["doc_ids"])[None])[0].numpy()
    for tokens, _, seg in segments(item):
        np.testing.assert_array_equal(pos[item["doc_ids"] == seg], np.arange(len(tokens)))


def test_every_example_lands_in_exactly_one_window_per_epoch(masked):
    examples, prefix = masked
    packed = PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=1, seed=0)
    w, s = packed.window_docs, packed.window_start
    epoch = [w[s[k] : s[k + 1]].tolist() for k in range(packed.windows_per_epoch)]
    assert sorted(d for docs in epoch for d in docs) == list(range(len(examples)))
    lengths = np.minimum([len(t) for t, _ in examples], SEQ + 1)
    assert all(lengths[docs].sum() <= SEQ + 1 for docs in epoch)
    assert packed.efficiency == pytest.approx(lengths.sum() / (len(epoch) * (SEQ + 1)))


def test_truncation_is_counted_and_reported(masked):
    examples, prefix = masked
    packed = PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=4, seed=0, name="sft")
    assert packed.truncated == 1 and packed.truncated_tokens == 9  # 41 tokens into a window of 32
    line = packed.summary()
    assert "1 of 41 examples longer than the window were truncated" in line and "efficiency" in line


def test_packing_is_deterministic_cached_and_seeded(masked, tmp_path):
    _, prefix = masked
    build = lambda seed: PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=30, seed=seed,
                                       cache_dir=tmp_path / "c")
    a, b, other = build(5), build(5), build(6)
    assert not a.loaded_from_cache and b.loaded_from_cache
    for i in range(30):
        for key in ("tokens", "doc_ids", "loss_mask"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    uncached = PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=30, seed=5)
    np.testing.assert_array_equal(uncached.window_docs, a.window_docs)
    assert any(not np.array_equal(a[i]["tokens"], other[i]["tokens"]) for i in range(30))


def test_unmasked_prefix_packs_with_every_token_but_the_first_a_target(tmp_path):
    examples = make_examples(num=10)
    packed = PackedDataset(IndexedDataset(write_plain(tmp_path / "plain", examples)), seq_len=SEQ, num_samples=3,
                           seed=0)
    for tokens, mask, _ in segments(packed[0])[: len(packed.window_examples(0))]:
        assert not mask[0] and mask[1:].all()


def test_concatenated_windows_carry_the_mask_of_a_masked_prefix(masked):
    examples, prefix = masked
    ds = GPTDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=20, seed=1)
    stream_tokens = np.concatenate([ds.dataset[int(d)] for d in ds.doc_order])
    stream_mask = np.concatenate([examples[int(d)][1] for d in ds.doc_order])
    for i in range(20):
        j = int(ds.shuffle[i])
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"], stream_tokens[j * SEQ : j * SEQ + SEQ + 1])
        np.testing.assert_array_equal(item["loss_mask"], stream_mask[j * SEQ : j * SEQ + SEQ + 1])


# ----------------------------------------------------------------------------------------------- in the model


def tiny_model():
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                      rope_theta=10000.0)
    return build_model(cfg, "cpu", seed=0)


def test_packed_examples_never_see_each_other(masked):
    _, prefix = masked
    packed = PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=20, seed=0)
    i = next(i for i in range(20) if len(packed.window_examples(i)) >= 3)
    batch = collate_samples([packed[i]])
    model = tiny_model().eval()
    with torch.no_grad():
        logits = model(batch.input_ids, doc_ids=batch.doc_ids)[0]
        ids = batch.doc_ids[0]
        for seg in range(len(packed.window_examples(i))):
            where = torch.nonzero(ids == seg).flatten()
            alone = model(batch.input_ids[:, where])[0]  # the example by itself, positions from 0
            torch.testing.assert_close(logits[where], alone, rtol=1e-5, atol=1e-5)


def test_masked_loss_is_the_mean_over_target_tokens(masked):
    """The model's loss on a packed batch against float64 log-softmax summed over target tokens by hand, each
    example run alone (no document masking involved in the reference)."""
    examples, prefix = masked
    packed = PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=6, seed=0)
    samples = [packed[i] for i in range(6)]
    batch = collate_samples(samples)
    model = tiny_model()
    loss = model(batch.input_ids, batch.labels, doc_ids=batch.doc_ids).item()

    ref = tiny_model().double()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(6):
            for doc in packed.window_examples(i).tolist():
                tokens, mask = examples[doc]
                n = min(len(tokens), SEQ + 1)
                x = torch.from_numpy(tokens[:n].astype(np.int64))[None]
                logp = F.log_softmax(ref(x[:, :-1])[0].double(), dim=-1)
                for j in range(1, n):
                    if mask[j]:  # token j is a target, predicted from position j - 1
                        total -= logp[j - 1, tokens[j]].item()
                        count += 1
    assert count == batch.num_targets > 0
    assert loss == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------------------------- blends


def test_blend_of_packed_masked_and_concatenated_unmasked_sources(masked, tmp_path):
    _, sft = masked
    replay = write_plain(tmp_path / "replay", make_examples(num=30, seed=9, max_len=40))
    sources = [DataSource(path=sft, weight=0.9, packing="pack"), DataSource(path=replay, weight=0.1)]
    ds = build_blended_dataset(sources, seq_len=SEQ, num_samples=40, seed=1, cache_dir=tmp_path / "cache")
    assert [s.packing for s in ds.sources] == ["pack", "concat"]
    assert isinstance(ds.sources[0].dataset, PackedDataset) and isinstance(ds.sources[1].dataset, GPTDataset)
    (line,) = ds.packing_summaries()
    assert line.startswith("packed sft:") and "efficiency" in line
    from_replay = [i for i in range(40) if ds.source_ids[i] == 1]
    assert len(from_replay) == 4
    # One micro-batch holding both kinds: replay samples predict every token, SFT samples only their targets.
    batch = collate_samples([ds[i] for i in range(8)])
    for row, i in enumerate(range(8)):
        if ds.source_ids[i] == 1:
            assert (batch.labels[row] != IGNORE_INDEX).all()
        else:
            want = torch.from_numpy(ds[i]["loss_mask"][1:])
            assert torch.equal(batch.labels[row] != IGNORE_INDEX, want)
    # The packing mode is part of the blend's identity (the samples differ), and so is the prefix's mask.
    concat = build_blended_dataset([DataSource(path=sft, weight=0.9), DataSource(path=replay, weight=0.1)],
                                   seq_len=SEQ, num_samples=40, seed=1, cache_dir=tmp_path / "cache")
    assert concat.fingerprint != ds.fingerprint
    with pytest.raises(ValueError, match="packing must be one of"):
        build_blended_dataset([DataSource(path=sft, packing="bogus")], seq_len=SEQ, num_samples=4, seed=1,
                              cache_dir=None)
