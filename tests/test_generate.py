"""Sampling with the KV cache against full recomputation: logits, greedy and seeded sampling, ragged batches."""

import pytest
import torch

from megasynth.config import ModelConfig
from megasynth.generate import KVCache, filter_logits, generate, sample_next, sample_without_cache
from megasynth.model import Transformer, build_model


def build(seed: int = 0, **overrides) -> Transformer:
    # init_std 0.3: peaked next-token distributions, so a greedy argmax is never decided by rounding noise.
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                rope_theta=10000.0, init_std=0.3)
    base.update(overrides)
    model = build_model(ModelConfig(**base), "cpu", seed=seed)
    return model.eval()


PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [61], [7, 7, 30, 12], [90, 1, 44, 23, 16, 8, 55, 70, 31, 4]]


def test_cached_logits_match_full_forward_on_a_ragged_batch():
    model = build()
    gen = torch.Generator().manual_seed(1)
    full = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 3, 6)]
    prompts = [seq[:-2] for seq in full]  # prefill all but the last two tokens, then decode them one at a time
    longest = max(map(len, prompts))
    ids = torch.zeros(3, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p)
    pad = torch.tensor([longest - len(p) for p in prompts])
    cache = KVCache(model.cfg, 3, longest + 2, "cpu", torch.float32)
    with torch.no_grad():
        got = [model(ids, positions=cache.reserve(longest, left_pad=pad), kv_cache=cache)[:, -1]]
        for step in range(2):
            nxt = torch.tensor([seq[len(p) + step] for seq, p in zip(full, prompts)])
            got.append(model(nxt[:, None], positions=cache.reserve(1), kv_cache=cache)[:, -1])
        for b, seq in enumerate(full):
            ref = model(torch.tensor([seq]))[0]  # plain causal forward, no cache, no padding
            for step in range(3):
                # fp32 with different summation orders (padded, chunked attention): rounding ~1e-6 on logits ~O(1).
                torch.testing.assert_close(got[step][b], ref[len(prompts[b]) - 1 + step], atol=2e-5, rtol=0)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_greedy_matches_no_cache_reference(decode):
    model = build()
    want = sample_without_cache(model, PROMPTS, max_new_tokens=12, temperature=0)
    got = generate(model, PROMPTS, max_new_tokens=12, temperature=0, decode=decode)
    assert got == want
    assert all(len(g) == 12 for g in got)
    # One new token: the prefill alone (the static cache then has no free slot and must not be touched).
    assert generate(model, PROMPTS, max_new_tokens=1, temperature=0, decode=decode) == [w[:1] for w in want]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_seeded_sampling_matches_no_cache_reference(decode):
    model = build(seed=3)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    want = sample_without_cache(model, PROMPTS, **kwargs)
    got = generate(model, PROMPTS, decode=decode, **kwargs)
    assert got == want
    assert generate(model, PROMPTS, decode=decode, **{**kwargs, "seed": 99}) != got  # the seed matters


def test_ragged_batch_equals_one_by_one_and_is_order_independent():
    model = build(seed=5)
    kwargs = dict(max_new_tokens=8, temperature=0.8, seed=7)
    batch = generate(model, PROMPTS, **kwargs)
    alone = [generate(model, [p], row_ids=[i], **kwargs)[0] for i, p in enumerate(PROMPTS)]
    assert batch == alone
    order = [2, 0, 3, 1]
    shuffled = generate(model, [PROMPTS[i] for i in order], row_ids=order, **kwargs)
    assert shuffled == [batch[i] for i in order]


def test_stops_at_eod_inclusive_and_finished_rows_leave_the_batch():
    model = build(seed=2)
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    # Declare a token the greedy run of row 0 emits at step 3 to be EOD: row 0 must stop right there.
    eod = free[0][3]
    got = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eod_id=eod)
    for row, full in zip(got, free):
        cut = full.index(eod) + 1 if eod in full else len(full)
        assert row == full[:cut]
    assert got[0][-1] == eod and len(got[0]) <= 4
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0, eod_id=eod, stop_at_eod=False) == free
    static = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eod_id=eod, decode="static")
    assert static == got


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # top_p 0.8: 0.5 + 0.3 reaches 0.8, so two tokens; 0.81 needs the third.
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    draws = sample_next(probs.log().expand(4000, 4), temperature=1.0, generators=gens)
    freq = torch.bincount(draws, minlength=4).double() / 4000
    # 4000 draws: the standard error of a frequency is <= sqrt(0.25/4000) = 0.008; 0.04 is 5 sigma.
    torch.testing.assert_close(freq, probs.double(), atol=0.04, rtol=0)
    assert freq[3] == 0


def test_bad_arguments_are_named():
    model = build()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 97]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(model, [[1]], max_new_tokens=2, decode="cuda_graph")
