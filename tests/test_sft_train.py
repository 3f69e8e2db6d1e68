"""Training on loss-masked data (issue 11): the token-weighted loss over micro-batches and data-parallel ranks
(tp=2 x dp=2 on gloo against one process, with unequal target counts per rank and a micro-batch without
targets), held-out evaluation on a masked prefix, and an SFT run started from a pretrained checkpoint on a blend
of packed instruction data and concatenated replay data."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist import run_on_ranks
from helpers import TINY_VOCAB, tiny_config, write_pattern_corpus

from megasynth.config import ModelConfig, ParallelConfig, save_config
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.data.loader import DistributedBatchLoader, collate_samples
from megasynth.data.packed_dataset import PackedDataset
from megasynth.distributed import DistInfo
from megasynth.metrics import read_metrics
from megasynth.model import build_model
from megasynth.train import evaluate, main, train_step

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_rank=0, dp_size=1,
               tp_rank=0, tp_size=1)
SEQ = 32  # divisible by tp=2 (sequence parallelism splits the inputs)
MODEL = ModelConfig(vocab_size=TINY_VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                    rope_theta=10000.0, tie_embeddings=False)


def write_instruction_prefix(prefix, *, num=40, seed=0, vocab=TINY_VOCAB):
    """Pattern-like 'prompt -> response' examples: the response repeats the prompt's first token pattern, so a
    model can learn it; the mask marks the response (and its EOD) as targets."""
    rng = np.random.default_rng(seed)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"vocab_size": vocab, "eod_id": 0}, loss_mask=True) as w:
        for _ in range(num):
            prompt = rng.integers(1, vocab, size=int(rng.integers(3, 10)))
            response = np.resize(prompt[:3], int(rng.integers(2, 12)))
            tokens = np.concatenate([prompt, response, [0]])
            mask = np.r_[np.zeros(prompt.size, bool), np.ones(response.size + 1, bool)]
            w.add_document(tokens, loss_mask=mask)
    return str(prefix)


class ZeroTargets:
    """A dataset whose samples in `silent` have no target at all (a masked example that is all context)."""

    def __init__(self, dataset, silent):
        self.dataset, self.silent = dataset, set(silent)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        if i in self.silent:
            item["loss_mask"] = np.zeros_like(item["loss_mask"])
        return item


def global_batch(prefix):
    """8 packed samples; samples 0 and 1 (dp rank 0's first micro-batch at dp=2, mb=2) have no targets."""
    return ZeroTargets(PackedDataset(IndexedDataset(prefix), seq_len=SEQ, num_samples=8, seed=0), {0, 1})


class RecordingOptimizer:
    """Stands in for AdamW: records the (full) gradients train_step hands to step()."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, None, []

    def step(self):
        self.grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def reference_loss(prefix) -> float:
    """float64, by hand: -log p(target) summed over every target token of the global batch / their count."""
    ds = global_batch(prefix)
    model = build_model(MODEL, "cpu", seed=0).double()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            for seg in np.unique(item["doc_ids"]):
                where = np.flatnonzero(item["doc_ids"] == seg)
                x = torch.from_numpy(item["tokens"][where])[None]
                logp = F.log_softmax(model(x)[0].double(), dim=-1)
                for j in range(1, where.size):
                    if item["loss_mask"][where[j]]:
                        total -= logp[j - 1, int(x[0, j])].item()
                        count += 1
    return total / count


def tp2_dp2_step(prefix) -> dict:
    """One train_step at tp=2 x dp=2 (each rank's loader slice of the global batch); rank 0 reports."""
    from megasynth.distributed import init_distributed
    from megasynth.parallelize import parallelize_model

    info = init_distributed(2, "cpu")
    model = parallelize_model(build_model(MODEL, "cpu", seed=0), info, ParallelConfig(param_dtype="float32"),
                              torch.float32)
    loader = DistributedBatchLoader(global_batch(prefix), global_batch_size=8, micro_batch_size=2,
                                    dp_rank=info.dp_rank, dp_size=info.dp_size)
    batches = loader.next_step()
    opt, stats = RecordingOptimizer(model), {}
    loss, grad_norm = train_step(model, opt, batches, info=info, grad_clip=0.0, stats=stats)
    return {"loss": loss, "grad_norm": grad_norm, "grads": opt.grads, "targets": stats["targets"],
            "my_targets": [b.num_targets for b in batches], "dp_rank": info.dp_rank}


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    return write_instruction_prefix(tmp_path_factory.mktemp("sft") / "sft")


def test_token_weighted_loss_over_tp2_dp2_equals_one_process(sft_prefix):
    reports = run_on_ranks(tp2_dp2_step, 4, sft_prefix, timeout=180)
    # The ranks of dp group 0 hold a micro-batch with no targets, and the two groups hold unequal counts.
    by_dp = {r["dp_rank"]: r["my_targets"] for r in reports}
    assert by_dp[0][0] == 0 and sum(by_dp[0]) != sum(by_dp[1])

    loader = DistributedBatchLoader(global_batch(sft_prefix), global_batch_size=8, micro_batch_size=2)
    model = build_model(MODEL, "cpu", seed=0)
    opt, stats = RecordingOptimizer(model), {}
    loss, _ = train_step(model, opt, loader.next_step(), info=CPU, grad_clip=0.0, stats=stats)
    want = reference_loss(sft_prefix)
    assert stats["targets"] == sum(by_dp[0]) + sum(by_dp[1])
    assert loss == pytest.approx(want, rel=1e-5)  # fp32 against float64
    for r in reports:
        assert r["targets"] == stats["targets"]
        # A mean of per-micro-batch means would differ by far more than fp32 noise (the counts are unequal).
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    grads = reports[0]["grads"]
    for name, g in opt.grads.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5 * g.abs().max().item() + 1e-12, msg=name)


def test_evaluation_on_a_masked_prefix_reports_the_masked_loss(sft_prefix):
    ds = PackedDataset(IndexedDataset(sft_prefix), seq_len=SEQ, num_samples=8, seed=0)
    batches = [collate_samples([ds[i] for i in range(k, k + 4)]) for k in (0, 4)]
    model = build_model(MODEL, "cpu", seed=0)
    got = evaluate(model, batches, info=CPU)
    ref = build_model(MODEL, "cpu", seed=0).double()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = ref(b.input_ids, doc_ids=b.doc_ids).double()
            keep = b.labels != -100
            total += F.cross_entropy(logits[keep], b.labels[keep], reduction="sum").item()
            count += int(keep.sum())
    # Only the answers' tokens count: not the prompts, not the padding.
    assert count == sum(int(ds[i]["loss_mask"][1:].sum()) for i in range(8)) < sum(b.labels.numel() for b in batches)
    assert got == pytest.approx(total / count, rel=1e-5)


def test_sft_run_from_a_pretrained_checkpoint_on_a_blend_with_replay(tmp_path, sft_prefix, capsys):
    replay = write_pattern_corpus(tmp_path / "replay")
    valid = write_instruction_prefix(tmp_path / "sft_valid", num=12, seed=1)
    base_cfg = tiny_config(tmp_path / "base", replay, **{"train.steps": 4, "data.seq_len": SEQ})
    save_config(base_cfg, tmp_path / "base.toml")
    assert main(["--config", str(tmp_path / "base.toml")]) == 0

    sources = [{"path": sft_prefix, "weight": 0.9, "packing": "pack", "name": "sft"},
               {"path": replay, "weight": 0.1, "name": "replay"}]
    cfg = tiny_config(tmp_path / "sft_run", replay, valid_prefix=valid, **{
        "data.data_path": "", "data.sources": sources, "data.seq_len": SEQ, "train.steps": 4,
        "train.eval_every": 2, "train.init_from": str(tmp_path / "base"), "optim.warmup_steps": 2})
    save_config(cfg, tmp_path / "sft.toml")
    assert main(["--config", str(tmp_path / "sft.toml")]) == 0
    records = read_metrics(tmp_path / "sft_run" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # Its own schedule: warmup from 0 at step 1, not the base run's position.
    assert train[0]["lr"] == pytest.approx(0.0, abs=1e-12) or train[0]["lr"] < train[1]["lr"]
    tokens_per_step = 8 * SEQ
    assert all(0 < r["targets"] < tokens_per_step for r in train)  # masks and padding are not targets
    assert [e["step"] for e in evals] == [0, 2, 4] and all(np.isfinite(e["loss"]) for e in evals)
    out = capsys.readouterr()
    console = out.out + out.err
    assert "packed sft:" in console and "efficiency" in console and " targets | " in console

    # The weights came from the base run: its step-0 held-out loss differs from a fresh model's.
    fresh = tiny_config(tmp_path / "fresh", replay, valid_prefix=valid, **{
        "data.data_path": "", "data.sources": sources, "data.seq_len": SEQ, "train.steps": 1, "train.eval_every": 1})
    save_config(fresh, tmp_path / "fresh.toml")
    assert main(["--config", str(tmp_path / "fresh.toml")]) == 0
    fresh_eval = [r for r in read_metrics(tmp_path / "fresh" / "metrics.jsonl") if r["kind"] == "eval"][0]
    assert fresh_eval["loss"] != pytest.approx(evals[0]["loss"], rel=1e-3)


def test_metrics_line_shows_targets():
    from megasynth.metrics import format_train_line

    rec = {"step": 3, "loss": 1.0, "grad_norm": 0.5, "lr": 1e-3, "targets": 1234, "tokens_per_s": 10.0,
           "tflops": 0.0, "mfu": None, "mem_gb": 0.0}
    assert "1,234 targets" in format_train_line(rec, 10, 5.0)
