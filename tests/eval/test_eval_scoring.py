"""Eval metrics against independent references: log-likelihoods from a plain per-request forward in float64,
predictions from the no-cache sampler, hand-computed EM/F1, perplexity from per-document forwards."""

import math

import numpy as np
import pytest
import torch

from megasynth.config import ModelConfig
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.eval.generative import evaluate_generative, exact_match, normalize_answer, token_f1
from megasynth.eval.loglik import score_continuations
from megasynth.eval.multiple_choice import PromptOptions, draw_fewshot, evaluate_multiple_choice, render
from megasynth.eval.perplexity import num_windows_of, perplexity_metrics, perplexity_sums
from megasynth.eval.tasks import GenerativeExample, MultipleChoiceExample, QualityExample
from megasynth.generate import sample_without_cache
from megasynth.model import build_model
from megasynth.tokenizer import train_bpe_tokenizer

TEXT = ["The capital of France is Paris. The capital of Italy is Rome.",
        "Question: what colour is the sky?\nAnswer: blue", "Seven plus one is eight; two plus two is four."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(TEXT * 30, tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      max_seq_len=128, rope_theta=10000.0, init_std=0.3)
    m = build_model(cfg, "cpu", seed=0)
    return m.eval()


def loglik_ref(model, ctx, cont) -> tuple[float, bool]:
    """Sum of log p(cont | ctx) from one unbatched forward, log-softmax in float64."""
    seq = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0].double(), dim=-1)
    rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[r, t]) for r, t in zip(rows, cont))
    greedy = all(int(logp[r].argmax()) == t for r, t in zip(rows, cont))
    return total, greedy


def test_batched_loglik_matches_a_plain_forward_per_request(model):
    gen = torch.Generator().manual_seed(0)
    def rand(n):
        return torch.randint(0, 300, (n,), generator=gen).tolist()

    requests = [(rand(n), rand(m)) for n, m in [(5, 1), (17, 4), (1, 3), (30, 2), (9, 9)]]
    got = score_continuations(model, requests, batch_size=2)
    for (ctx, cont), score in zip(requests, got):
        want, greedy = loglik_ref(model, ctx, cont)
        # fp32 forward summed in float64 vs a float64 log-softmax of the same fp32 logits: <= ~1e-5 per token.
        assert score.logprob == pytest.approx(want, abs=1e-4)
        assert score.num_tokens == len(cont)
    # A continuation made of the model's own greedy tokens is flagged greedy.
    ctx = [3, 8, 5]
    greedy_cont = sample_without_cache(model, [ctx], max_new_tokens=3, temperature=0)[0]
    assert score_continuations(model, [(ctx, greedy_cont)])[0].is_greedy
    # Too long: the context loses tokens on the left, as a plain forward on the last max_len + 1 tokens would.
    long_ctx = list(range(1, 200))
    got = score_continuations(model, [(long_ctx, [7, 9])])[0].logprob
    kept = (long_ctx + [7, 9])[-129:]
    assert got == pytest.approx(loglik_ref(model, kept[:-2], [7, 9])[0], abs=1e-4)


def test_multiple_choice_acc_and_acc_norm_against_reference(model, tok):
    contexts = ["The capital of France is", "Two plus two is", "The sky is", "Seven plus one is"]
    choices = [["Paris", "Rome", "a big city"], ["four", "five"], ["blue", "green", "dark"], ["eight", "nine", "six"]]
    start = [tok.eod_id]
    ref = [[loglik_ref(model, start + tok.encode(c), tok.encode(" " + ch))[0] for ch in chs]
           for c, chs in zip(contexts, choices)]
    # Gold = the reference argmax for examples 0 and 2, another index for 1 and 3: acc must be exactly 0.5.
    golds = [int(np.argmax(r)) if i % 2 == 0 else (int(np.argmax(r)) + 1) % len(r) for i, r in enumerate(ref)]
    examples = [MultipleChoiceExample(str(i), i + 1, c, chs, g)
                for i, (c, chs, g) in enumerate(zip(contexts, choices, golds))]
    records = evaluate_multiple_choice(model, tok, examples, range(4), batch_size=3, start_ids=start)
    assert [r["acc"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    for r, lls, chs, g in zip(records, ref, choices, golds):
        assert r["logliks"] == pytest.approx(lls, abs=1e-4)
        norm = [ll / len(ch) for ll, ch in zip(lls, chs)]  # normalised by characters of the choice text
        assert r["pred_norm"] == int(np.argmax(norm)) and r["acc_norm"] == float(np.argmax(norm) == g)


def test_fewshot_prompt_is_seeded_by_example_index(model, tok, monkeypatch):
    pool = [MultipleChoiceExample(f"s{i}", i, f"shot {i}:", ["yes", "no"], i % 2) for i in range(6)]
    assert draw_fewshot(pool, 3, seed=1, index=4) == draw_fewshot(pool, 3, seed=1, index=4)
    assert draw_fewshot(pool, 3, seed=1, index=4) != draw_fewshot(pool, 3, seed=1, index=5)
    assert len({s.id for s in draw_fewshot(pool, 6, seed=1, index=0)}) == 6  # without replacement
    with pytest.raises(ValueError, match="7-shot needs at least 7"):
        draw_fewshot(pool, 7, seed=1, index=0)
    seen = []
    monkeypatch.setattr("megasynth.eval.multiple_choice.score_continuations",
                        lambda m, reqs, **kw: seen.extend(reqs) or [type("S", (), {"logprob": 0.0})] * len(reqs))
    query = MultipleChoiceExample("q", 1, "query:", ["a", "b"], 0)
    evaluate_multiple_choice(model, tok, [query], [0], fewshot_pool=pool, num_fewshot=2, seed=3, start_ids=[0])
    shots = draw_fewshot(pool, 2, seed=3, index=0)
    expected = "".join(f"{s.context} {s.choices[s.gold]}\n\n" for s in shots) + "query:"
    assert seen[0] == ([0] + tok.encode(expected), tok.encode(" a"))
    assert seen[1][1] == tok.encode(" b")


def test_quality_prompts_are_closed_book():
    ex = QualityExample("1", 1, "art-9", "The Moon Trip", "Who flew?", ["Ann", "Bob", "Cy", "Di"], 2)
    prompt, choices, gold = render(ex, PromptOptions())
    assert prompt == "Title: The Moon Trip\nQuestion: Who flew?\nAnswer:" and choices == ex.options and gold == 2
    prompt, choices, _ = render(ex, PromptOptions(quality_title=False, quality_answer="letter"))
    assert prompt == "Question: Who flew?\nA. Ann\nB. Bob\nC. Cy\nD. Di\nAnswer:" and choices == ["A", "B", "C", "D"]


def test_answer_normalisation_em_and_f1_by_hand():
    assert normalize_answer("  The  Eiffel-Tower, Paris! ") == "eiffeltower paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Paris.", ["London", "paris"]) == 1.0
    assert exact_match("Paris France", ["paris"]) == 0.0
    # pred {new, york, city} vs gold {new, york}: precision 2/3, recall 1 -> F1 = 0.8; vs {york}: 0.5.
    assert token_f1("New York City", ["York", "new york"]) == pytest.approx(0.8)
    assert token_f1("a", ["the"]) == 1.0  # both empty after normalisation
    assert token_f1("", ["x"]) == 0.0
    # Repeated tokens count with multiplicity: pred [x, x, y] vs gold [x, y, y]: common 2 -> P = R = 2/3.
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)


def test_generative_predictions_and_metrics_match_the_reference_sampler(model, tok):
    prompts = ["Question: what colour is the sky?\nAnswer:", "The capital of Italy is", "Seven plus one"]
    start = [tok.eod_id]
    newline = {i for i in range(tok.vocab_size) if "\n" in tok.decode([i])}
    refs = []
    for p in prompts:
        out = sample_without_cache(model, [start + tok.encode(p)], max_new_tokens=6, temperature=0,
                                   eod_id=tok.eod_id, stop_ids=newline)[0]
        refs.append(tok.decode([t for t in out if t != tok.eod_id]).split("\n")[0].strip())
    answers = [[refs[0]], ["no such answer", refs[1].upper() + "!"], ["unrelated words entirely"]]
    examples = [GenerativeExample(str(i), i, p, a) for i, (p, a) in enumerate(zip(prompts, answers))]
    records = evaluate_generative(model, tok, examples, [0, 1, 2], max_new_tokens=6, batch_size=2, start_ids=start)
    assert [r["prediction"] for r in records] == refs
    for r, ref, ans in zip(records, refs, answers):
        assert r["exact_match"] == exact_match(ref, ans) and r["f1"] == token_f1(ref, ans)
    assert records[0]["exact_match"] == 1.0 and records[1]["exact_match"] == 1.0 and records[2]["f1"] < 1.0


def _write_prefix(path, docs):
    with IndexedDatasetWriter(path, np.uint16, metadata={"vocab_size": 320, "eod_id": 0}) as w:
        w.add_documents([np.asarray(d) for d in docs])
    return IndexedDataset(path)


@pytest.mark.parametrize("document_masking", [True, False])
def test_perplexity_against_per_document_forwards(model, tmp_path, document_masking):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 300, n), 0) for n in (12, 3, 25, 7, 1, 18)]
    ds = _write_prefix(tmp_path / "valid", docs)
    seq_len = 16
    tokens = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    nll, count = 0.0, 0
    for w in range(num_windows_of(len(tokens), seq_len)):
        lo, hi = w * seq_len, min(w * seq_len + seq_len + 1, len(tokens))
        inputs = tokens[lo : hi - 1]
        # Segments the model may attend within: whole documents clipped to the window, or the whole window.
        bounds = [0] + [p for p in range(1, len(inputs)) if doc_of[lo + p] != doc_of[lo + p - 1]] + [len(inputs)]
        if not document_masking:
            bounds = [0, len(inputs)]
        for a, b in zip(bounds, bounds[1:]):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.from_numpy(inputs[a:b])[None])[0].double(), dim=-1)
            targets = tokens[lo + a + 1 : lo + b + 1]
            nll -= float(logp[torch.arange(b - a), torch.tensor(targets)].sum())
            count += b - a
    assert count == len(tokens) - 1  # every token but the first is predicted once
    sums = perplexity_sums(model, ds, seq_len=seq_len, batch_size=3, document_masking=document_masking)
    assert sums["tokens"] == count and sums["windows"] == 5
    # fp32 forward vs float64 reference log-softmax: ~1e-6 per token over 65 tokens.
    assert sums["nll"] == pytest.approx(nll, abs=1e-3)
    # Two "ranks" add up to the whole, exactly the same token count.
    halves = [perplexity_sums(model, ds, seq_len=seq_len, document_masking=document_masking, rank=r, world_size=2)
              for r in range(2)]
    assert sum(h["tokens"] for h in halves) == count
    assert sum(h["nll"] for h in halves) == pytest.approx(nll, abs=1e-3)
    metrics = perplexity_metrics(sums)
    assert metrics["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    first = perplexity_sums(model, ds, seq_len=seq_len, num_windows=2)
    assert first["tokens"] == 2 * seq_len
    with pytest.raises(ValueError, match="6 windows of 17 tokens asked for"):
        perplexity_sums(model, ds, seq_len=seq_len, num_windows=6)
