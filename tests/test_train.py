"""The training loop end to end on a tiny model (megasynth/train.py): learning, accumulation, non-finite steps,
exit codes, metrics, and bit-identical resumption after SIGKILL.

Most runs call `main()` in-process (a single process needs no launcher); the kill test runs each run in a process
of its own (tests/dist.py's start_process), the one it kills included.
"""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist import start_process
from helpers import TINY_VOCAB, tiny_config, write_pattern_corpus

from megasynth import checkpoint
from megasynth.config import save_config
from megasynth.data.loader import IGNORE_INDEX, Batch
from megasynth.distributed import DistInfo
from megasynth.metrics import read_metrics
from megasynth.model import Transformer
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer
from megasynth.train import main, train_step
from megasynth.train_setup import copy_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_rank=0, dp_size=1,
               tp_rank=0, tp_size=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_pattern_corpus(root / "train"), write_pattern_corpus(root / "valid", num_docs=8, seed=0)


def run(tmp_path, corpus, name="run", **overrides):
    """main() on a config file written from tiny_config(...); returns (exit code, RUN_DIR)."""
    cfg = tiny_config(tmp_path / name, corpus[0], valid_prefix=corpus[1], **overrides)
    save_config(cfg, tmp_path / f"{name}.toml")
    return main(["--config", str(tmp_path / f"{name}.toml")]), tmp_path / name


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_loss_falls_on_a_memorisable_corpus(tmp_path, corpus):
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 30})
    assert code == 0
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    # Step 1 sits at ln(64) = 4.16 (init std 0.02 gives near-uniform logits). A model that only learned token
    # frequencies would stay near ln(20) = 3.0 (4 patterns x 5 tokens); one that uses the context approaches
    # the corpus floor of ~0.04 (only the pattern after each EOD is uncertain: ln 4 over 37 tokens). This
    # setup reaches ~0.7 by step 30; requiring < 30% of the start (1.25) demands in-context learning.
    assert losses[1] == pytest.approx(4.16, abs=0.1)
    assert sum(losses[s] for s in (28, 29, 30)) / 3 < 0.3 * losses[1]


class RecordingOptimizer:
    """Stands in for the optimizer: records the gradients train_step hands to step()."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, None, []

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_accumulation_weights_micro_batches_by_their_targets(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, TINY_VOCAB, (8, 17), generator=gen)
    doc_ids = torch.zeros(8, 17, dtype=torch.int32)
    doc_ids[:, 9:] = 1
    labels = tokens[:, 1:].clone()
    labels[:4, 2:] = IGNORE_INDEX  # micro-batch 1 has 8 targets, micro-batch 2 has 64

    def batch(rows):
        return Batch(tokens[rows, :-1], labels[rows], doc_ids[rows, :-1])

    def grads_of(batches):
        model = Transformer(cfg.model)
        model.init_weights(0)
        opt = RecordingOptimizer(model)
        loss, _ = train_step(model, opt, batches, info=CPU, grad_clip=0.0)
        return loss, opt.grads

    loss_acc, acc = grads_of([batch(slice(0, 4)), batch(slice(4, 8))])
    loss_one, one = grads_of([batch(slice(0, 8))])
    # Independent reference: float64, the whole batch, cross-entropy averaged over all 72 targets at once.
    ref = Transformer(cfg.model)
    ref.init_weights(0)
    ref.double()
    logits = ref.lm_head(ref.hidden_states(tokens[:, :-1], doc_ids=doc_ids[:, :-1]))
    ref_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref_loss.backward()
    # fp32 forward/backward through 2 layers differs from float64 by ~3e-7 of the largest gradient entry
    # (measured); 1e-5 leaves 30x headroom, while weighting the two micro-batches equally (mean of means)
    # misweights them 0.5/0.5 instead of 8/72 vs 64/72 and misses by orders of magnitude more (checked below).
    assert loss_acc == pytest.approx(ref_loss.item(), rel=1e-6) and loss_one == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, p in ref.named_parameters():
        tol = 1e-5 * p.grad.abs().max().item()
        assert (acc[name].double() - p.grad).abs().max().item() <= tol, name
        assert (acc[name] - one[name]).abs().max().item() <= tol, name

    naive = Transformer(cfg.model)
    naive.init_weights(0)
    mean_of_means = (naive(tokens[:4, :-1], labels[:4], doc_ids=doc_ids[:4, :-1])
                     + naive(tokens[4:, :-1], labels[4:], doc_ids=doc_ids[4:, :-1])) / 2
    mean_of_means.backward()
    g = naive.embed_tokens.weight.grad.double() - ref.embed_tokens.weight.grad
    assert g.abs().max().item() > 100 * 1e-5 * ref.embed_tokens.weight.grad.abs().max().item()


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("MEGASYNTH_FAULT_NAN_AT_STEP", "3,8")
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 10, "train.checkpoint_every": 4, "train.max_nonfinite_steps": 2})
    assert code == 0
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert records[3]["loss"] == "nan" and records[3]["nonfinite"] == 1 and records[4]["nonfinite"] == 0
    assert records[10]["nonfinite_total"] == 2
    # No checkpoint right after the skipped step 8; the final checkpoint's AdamW took 10 - 2 = 8 steps.
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [4, 10]
    model, cfg = checkpoint.load_for_inference(run_dir)
    opt = torch.optim.AdamW(model.parameters())
    parts = checkpoint.load_checkpoint(run_dir, model=model, optimizer=opt)
    assert parts["progress"]["nonfinite_total"] == 2
    assert {float(s["step"]) for s in opt.state_dict()["state"].values()} == {8.0}


def test_too_many_nonfinite_steps_stop_with_exit_code_3(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("MEGASYNTH_FAULT_NAN_AT_STEP", "6-20")
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 20, "train.checkpoint_every": 4, "train.max_nonfinite_steps": 3})
    assert code == 3
    out = capsys.readouterr().out
    assert "3 consecutive steps (through step 8)" in out and "train.max_nonfinite_steps=3" in out
    assert "step_00000004" in out
    latest = checkpoint.find_latest(run_dir / "checkpoints")
    assert latest.name == "step_00000004"
    model, _ = checkpoint.load_for_inference(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_config_errors_exit_2_naming_the_key(tmp_path, corpus, capsys):
    assert main(["--train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "did you mean 'train.steps'" in err and "Traceback" not in err
    code, _ = run(tmp_path, corpus, **{"train.global_batch_size": 10})
    assert code == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size=10" in err and "train.micro_batch_size=4" in err
    cfg = tiny_config(tmp_path / "missing", tmp_path / "no_such_prefix")
    save_config(cfg, tmp_path / "missing.toml")
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "no_such_prefix" in capsys.readouterr().err


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--train.max_nonfinite_steps=5" in out and "--data.allow_blend_change" in out
    # The "one process or many" sentence is followed by both command lines, not left hanging.
    intro = out.split("Every config key")[0]
    assert "python -m megasynth.train --config" in intro and "torchrun --nproc-per-node" in intro


def test_metrics_lines_and_run_directory(tmp_path, corpus):
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 6, "train.eval_every": 3, "train.log_every": 2})
    assert code == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    keys = {"kind", "step", "loss", "grad_norm", "lr", "tokens", "flops", "tokens_per_s", "tflops", "mfu",
            "mem_gb", "time"}
    assert all(keys <= set(r) for r in train)
    assert [r["step"] for r in train] == [1, 2, 4, 6]  # every log_every steps, plus the first and the last
    assert train[-1]["tokens"] == 6 * 8 * 16 and train[-1]["mfu"] is None
    assert [(r["step"], r["name"]) for r in evals] == [(0, "valid"), (3, "valid"), (6, "valid")]
    assert all({"tokens", "flops", "loss", "ppl"} <= set(r) for r in evals)
    assert evals[-1]["ppl"] == pytest.approx(2.718281828 ** evals[-1]["loss"], rel=1e-9)
    assert (run_dir / "config.toml").is_file()
    meta = checkpoint.read_meta(checkpoint.find_latest(run_dir / "checkpoints"))
    assert meta["step"] == 6 and meta["tokens"] == 6 * 8 * 16 and meta["blend_fingerprint"]


def test_resume_refuses_another_model_or_other_data(tmp_path, corpus):
    code, _ = run(tmp_path, corpus, **{"train.steps": 4})
    assert code == 0
    # Same run directory, different width: the checkpoint does not fit.
    code, _ = run(tmp_path, corpus, **{"train.steps": 8, "model.dim": 64})
    assert code == 2
    # How attention is computed is not part of the model: another backend or core resumes the same weights.
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 5, "model.attention": "fused_qknorm_rope",
                                             "model.attention_core": "reference"})
    assert code == 0 and checkpoint.find_latest(run_dir / "checkpoints").name == "step_00000005"
    other = write_pattern_corpus(tmp_path / "other", num_docs=40, seed=5)
    code, _ = run(tmp_path, (other, corpus[1]), **{"train.steps": 8})
    assert code == 2  # another dataset: its fingerprint differs from the checkpoint's
    code, run_dir = run(tmp_path, (other, corpus[1]), **{"train.steps": 8, "data.allow_blend_change": True})
    assert code == 0 and checkpoint.find_latest(run_dir / "checkpoints").name == "step_00000008"


def test_resume_none_starts_over_and_keeps_the_earlier_run(tmp_path, corpus, capsys):
    # The README says 'none' starts over: it does, and moves the earlier run aside instead of deleting it.
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 4})
    assert code == 0
    old_metrics = (run_dir / "metrics.jsonl").read_bytes()
    old_ckpt = checkpoint.find_latest(run_dir / "checkpoints")
    old_sums = {p.relative_to(old_ckpt): p.read_bytes() for p in old_ckpt.rglob("*") if p.is_file()}
    capsys.readouterr()
    code, run_dir = run(tmp_path, corpus, **{"train.steps": 2, "train.resume": "none"})
    assert code == 0
    out = capsys.readouterr().out
    (earlier,) = (run_dir / "earlier_runs").iterdir()
    assert f"moved the earlier run's checkpoints and metrics.jsonl to {earlier}" in out
    assert "resumed from" not in out
    # The new run trained from step 0; the old run's files are all there, byte for byte.
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert checkpoint.find_latest(run_dir / "checkpoints").name == "step_00000002"
    assert (earlier / "metrics.jsonl").read_bytes() == old_metrics
    moved = earlier / "checkpoints" / old_ckpt.name
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == old_sums
    checkpoint.verify_checkpoint(moved)


def test_the_tokenizer_named_by_the_sidecar_is_copied(tmp_path, capsys):
    tok = train_bpe_tokenizer(["the tokenizer the run was made with"] * 20, tmp_path / "tok", vocab_size=300)
    prefix = tmp_path / "data"
    Path(f"{prefix}.json").write_text(json.dumps({"tokenizer": tok.identity()}))
    assert copy_tokenizer(str(prefix), tmp_path / "run") == tok.identity()
    copied = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert copied.identity()["sha256"] == tok.identity()["sha256"]
    assert copied.encode("the run") == tok.encode("the run")
    # An unloadable tokenizer is a warning, not a failed run; the sidecar's identity is kept for meta.json.
    missing = {"type": "huggingface", "path": str(tmp_path / "gone"), "sha256": "abc"}
    Path(f"{prefix}.json").write_text(json.dumps({"tokenizer": missing}))
    assert copy_tokenizer(str(prefix), tmp_path / "other") == missing
    assert "could not copy the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "other" / "tokenizer").exists()
    assert copy_tokenizer(str(tmp_path / "no_sidecar"), tmp_path) is None


def test_sigkill_then_resume_is_bit_identical(tmp_path, corpus):
    steps = 20
    common = {"train.steps": steps, "train.eval_every": 5, "train.log_every": 1}

    def launch(name, **overrides):
        """main() on NAME.toml in a process of its own (tests/dist.py: a fork of a server that has imported
        megasynth and trained nothing; one torch thread), its console output in NAME.out / NAME.err."""
        cfg = tiny_config(tmp_path / name, corpus[0], valid_prefix=corpus[1], **common, **overrides)
        save_config(cfg, tmp_path / f"{name}.toml")
        return start_process(main, ["--config", str(tmp_path / f"{name}.toml")], stdout=tmp_path / f"{name}.out",
                             stderr=tmp_path / f"{name}.err")

    def finished(proc, name) -> str:
        proc.join(timeout=300)
        assert proc.exitcode == 0, (proc.exitcode, (tmp_path / f"{name}.err").read_text())
        return (tmp_path / f"{name}.out").read_text()

    whole = launch("whole")  # the uninterrupted run goes on beside the killed one (they share only the corpus)
    # The killed run saves after every 2nd step (saving must not change the numbers) and is killed as soon as
    # its first checkpoint is visible: ~18 steps and 9 saves before it would finish, and possibly mid-save.
    killed_run = {"train.checkpoint_every": 2, "train.keep_last": 3}
    proc = launch("killed", **killed_run)
    deadline = time.monotonic() + 240
    while checkpoint.find_latest(tmp_path / "killed" / "checkpoints") is None:
        assert proc.is_alive(), (tmp_path / "killed.err").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    killed_at = checkpoint.find_latest(tmp_path / "killed" / "checkpoints")
    assert int(killed_at.name[5:]) < steps

    assert "resumed from" in finished(launch("killed", **killed_run), "killed")  # the same run again
    finished(whole, "whole")
    records = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    # Every step exactly once (lines past the checkpoint were dropped on resume) and, on the CPU in fp32,
    # every loss, gradient norm, learning rate and held-out loss identical to the uninterrupted run.
    fields = ("kind", "step", "loss", "grad_norm", "lr", "tokens", "name")
    assert [tuple(r.get(k) for k in fields) for r in records] == [tuple(r.get(k) for k in fields) for r in expected]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
