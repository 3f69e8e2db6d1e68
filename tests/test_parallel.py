"""Tensor + data parallel training on CPU gloo ranks: megasynth/parallelize.py driven by the real trainer.

    pytest tests/test_parallel.py -x -q

One 4-rank launch (tests/dist.py) runs the trainer's own `_train` at tp=2 x dp=2 (with full activation
checkpointing) and at tp=1 x dp=4 (selective, no FSDP resharding) in the same process group (a new device mesh
for each layout), resumes a tp=2 x dp=2 checkpoint at tp=1 x dp=4, and records data slices and TP gradients;
the tests below compare all of it with single-process runs of the same trainer. Two more tests check one
scenario of the real CLI under torchrun (2 ranks with tp=2: rank 1 killed mid-run, then the command again).

The model is tiny (dim 32, 2 layers, 4 heads / 2 kv heads, vocab 64, seq 16) and everything is fp32, so
differences between layouts come only from the order of floating-point reductions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist import run_on_ranks
from helpers import TINY_VOCAB, tiny_config, write_pattern_corpus

from megasynth import checkpoint
from megasynth.config import ConfigError, save_config
from megasynth.distributed import DistInfo, init_distributed
from megasynth.metrics import read_metrics
from megasynth.model import Transformer, build_model
from megasynth.parallelize import check_parallel_shape, loss_parallel_context, parallelize_model

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 6, 5
# 4 heads / 2 kv heads split over tp=2; 8 sequences per step in micro-batches of 2, so a single process
# accumulates 4 micro-batches, dp=2 two per rank and dp=4 one: accumulation is part of what must agree.
LAYOUT = {"model.n_heads": 4, "model.n_kv_heads": 2, "train.steps": STEPS, "train.micro_batch_size": 2,
          "train.checkpoint_every": SAVE_AT, "train.eval_every": 3, "train.log_every": 1}


def layout_config(run_dir, corpus, tp: int = 1, **overrides):
    """tiny_config with LAYOUT, parallel.tp and `overrides` (dotted keys; parallel.* and log.* set afterwards,
    tiny_config's table has no such sections)."""
    overrides = {**LAYOUT, "parallel.tp": tp, **overrides}
    later = {k: overrides.pop(k) for k in list(overrides) if k.split(".")[0] in ("parallel", "log")}
    cfg = tiny_config(run_dir, corpus[0], valid_prefix=corpus[1], **overrides)
    for key, value in later.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def trainer_enters_loss_parallel() -> bool:
    import megasynth.train as trainer  # noqa: PLC0415

    return "loss_parallel_context" in inspect.getsource(trainer)


def _with_loss_parallel(fn):
    """Until megasynth/train.py enters loss_parallel_context itself: run a train/eval step inside it."""

    @functools.wraps(fn)
    def wrapped(*args, info, **kwargs):
        with loss_parallel_context(info):
            return fn(*args, info=info, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------------------------- on the ranks


class RecordingDataset:
    """A dataset wrapper that remembers which sample indices were read."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.dataset[i]


def _loader_slices(cfg, info, trainer) -> list[list[int]]:
    """The sample indices this rank's loader reads in each of the first two steps (built as the trainer does)."""
    from megasynth.data.loader import DistributedBatchLoader, build_train_dataset  # noqa: PLC0415

    t = cfg.train
    dataset = trainer.rank0_first(info, lambda: build_train_dataset(
        cfg.data, num_samples=t.steps * t.global_batch_size, seed=t.seed, cache_dir=Path(t.run_dir) / "cache"))
    recording = RecordingDataset(dataset)
    loader = DistributedBatchLoader(recording, global_batch_size=t.global_batch_size,
                                    micro_batch_size=t.micro_batch_size, dp_rank=info.dp_rank, dp_size=info.dp_size)
    steps = []
    for _ in range(2):
        loader.next_step()
        steps.append(recording.read)
        recording.read = []
    return steps


def grad_probe_batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=gen)
    labels = torch.randint(0, TINY_VOCAB, (2, 16), generator=gen)
    doc_ids = torch.cumsum(torch.rand(2, 16, generator=gen) < 0.15, dim=1).int()
    return ids, labels, doc_ids


def build_seeded_model(cfg) -> Transformer:
    """The trainer's recipe: megasynth.model.build_model with the run's seed."""
    return build_model(cfg.model, "cpu", seed=cfg.train.seed)


def _tp_probe(cfg, info) -> dict | None:
    """Full gradients of one forward/backward at this layout (every dp rank gets the same batch: the dp
    average is then the single-batch gradient), the logits, and the errors of misuse. Rank 0 returns them."""
    model = parallelize_model(build_seeded_model(cfg), info, cfg.parallel, torch.float32)
    ids, labels, doc_ids = grad_probe_batch()
    with loss_parallel_context(info):
        model(ids, labels, doc_ids=doc_ids).backward()
    out = {"grads": {name: p.grad.full_tensor() for name, p in model.named_parameters()}}
    with torch.no_grad():
        out["logits"] = model(ids, doc_ids=doc_ids)  # full [B, S, V] logits, a plain tensor, on every rank
    out["errors"] = []
    for call in (lambda: model(ids, labels), lambda: model(ids[:, :15])):
        try:
            call()
        except (RuntimeError, ValueError) as e:
            out["errors"].append(f"{type(e).__name__}: {e}")
    return out if info.rank == 0 else None


def four_rank_body(corpus, root: str) -> dict:
    """Everything the 4-rank tests need, from one launch (starting ranks costs seconds each time)."""
    import megasynth.train as trainer  # noqa: PLC0415

    if not trainer_enters_loss_parallel():
        trainer.train_step = _with_loss_parallel(trainer.train_step)
        trainer.evaluate = _with_loss_parallel(trainer.evaluate)
    root, out = Path(root), {}
    # The memory savers ride along: they must not change a single number (recomputation repeats the same ops).
    savers = {2: {"parallel.activation_checkpoint": "full"},
              1: {"parallel.activation_checkpoint": "selective", "parallel.fsdp_reshard_after_forward": False}}
    for tp in (2, 1):
        info = init_distributed(tp, "cpu")  # the process group exists; this builds a (4 // tp, tp) mesh
        name = f"tp{tp}_dp{4 // tp}"
        out[f"{name}/slices"] = (info.dp_rank, info.tp_rank,
                                 _loader_slices(layout_config(root / f"{name}_slices", corpus, tp), info, trainer))
        out[f"{name}/exit"] = trainer._train(layout_config(root / name, corpus, tp, **savers[tp]), info)
        if tp == 1:  # the tp=2 x dp=2 run's checkpoint of step SAVE_AT, continued at tp=1 x dp=4
            resume = root / "tp2_dp2" / "checkpoints" / checkpoint.step_dir_name(SAVE_AT)
            out["resumed_tp1_dp4/exit"] = trainer._train(
                layout_config(root / "resumed_tp1_dp4", corpus, tp, **{"train.resume": str(resume)}), info)
        else:
            out["probe"] = _tp_probe(layout_config(root / "probe", corpus, tp, **{"model.tie_embeddings": False}),
                                     info)
    return out


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return str(write_pattern_corpus(root / "train")), str(write_pattern_corpus(root / "valid", num_docs=8, seed=1))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Run directories of the 4-rank layouts and of the single-process reference, plus the rank reports."""
    root = tmp_path_factory.mktemp("layouts")
    reports = run_on_ranks(four_rank_body, 4, corpus, str(root), timeout=240)
    import megasynth.train as trainer  # noqa: PLC0415

    for name, overrides in (("single", {}), ("resumed_single", {"train.resume": str(
            root / "tp2_dp2" / "checkpoints" / checkpoint.step_dir_name(SAVE_AT))})):
        cfg = layout_config(root / name, corpus, 1, **overrides)
        save_config(cfg, root / f"{name}.toml")
        assert trainer.main(["--config", str(root / f"{name}.toml")]) == 0
    return root, reports


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind}


# ----------------------------------------------------------------------------------------------- tests


def test_every_layout_trains_to_the_end(runs):
    root, reports = runs
    for key in ("tp2_dp2/exit", "tp1_dp4/exit", "resumed_tp1_dp4/exit"):
        assert [r[key] for r in reports] == [0, 0, 0, 0], key


@pytest.mark.parametrize("layout", ["tp2_dp2", "tp1_dp4"])
def test_losses_match_a_single_process(runs, layout):
    root, _ = runs
    expected = losses(root / "single")
    got = losses(root / layout)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    # fp32 with sums in another order (sharded matmuls, gloo all-reduces, fewer accumulation steps): the losses
    # differ by a few ulps at step 1 and the gap grows slowly through Adam; 1e-5 relative is ~100 ulps.
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    # Held-out losses are not compared: the trainer's eval set holds eval_batches x micro_batch_size x dp
    # samples, so it differs between layouts. They must exist (evaluation ran under this layout) and be finite.
    assert sorted(losses(root / layout, "eval")) == [0, 3, 6]
    # The steps really moved the model: a layout that skipped its updates would have flat losses.
    assert expected[STEPS] < expected[1] - 0.1


@pytest.mark.parametrize("layout", ["tp2_dp2", "tp1_dp4"])
def test_final_weights_match_a_single_process(runs, layout):
    root, _ = runs
    # Saved at one layout, read back by a single process without a process group: DCP reshards on load.
    expected, _ = checkpoint.load_for_inference(root / "single")
    got, _ = checkpoint.load_for_inference(root / layout)
    assert checkpoint.find_latest(root / layout / "checkpoints").name == checkpoint.step_dir_name(STEPS)
    for (name, p), (_, q) in zip(expected.named_parameters(), got.named_parameters()):
        # Adam divides by sqrt(v), so for elements with tiny gradients a few-ulp gradient difference moves the
        # update by more than a few ulps. Observed after 6 steps: <= 2.3e-7 absolute (weights ~0.02-1). 5e-6
        # leaves 20x room and still fails any real layout bug (a wrong shard or a missing reduction moves
        # weights by about the learning rate, 1e-2, per step).
        torch.testing.assert_close(q, p, rtol=0, atol=5e-6, msg=name)


def test_checkpoint_saved_at_tp2_dp2_continues_at_other_layouts(runs):
    root, reports = runs
    reference = losses(root / "tp2_dp2")[SAVE_AT + 1]  # the step after the checkpoint, in the saving layout
    for resumed in ("resumed_tp1_dp4", "resumed_single"):
        got = losses(root / resumed)
        assert sorted(got) == [SAVE_AT + 1]  # a new run directory: only the step after the checkpoint
        assert got[SAVE_AT + 1] == pytest.approx(reference, rel=1e-5), resumed
    meta = checkpoint.read_meta(root / "tp2_dp2" / "checkpoints" / checkpoint.step_dir_name(SAVE_AT))
    assert (meta["tp"], meta["dp"]) == (2, 2)


@pytest.mark.parametrize("layout", ["tp2_dp2", "tp1_dp4"])
def test_data_slices_are_disjoint_over_dp_and_shared_over_tp(runs, layout):
    _, reports = runs
    dp_rank_tp_rank_steps = [r[f"{layout}/slices"] for r in reports]
    dp_size = 4 // int(layout[2])
    global_batch = 8
    for step in range(2):
        by_dp: dict[int, list[int]] = {}
        for dp_rank, _, steps in dp_rank_tp_rank_steps:
            indices = steps[step]
            assert by_dp.setdefault(dp_rank, indices) == indices  # every tp rank of a dp group reads the same
        assert sorted(by_dp) == list(range(dp_size))
        flat = [i for indices in by_dp.values() for i in indices]
        assert len(flat) == len(set(flat))  # no sample read by two dp groups
        assert sorted(flat) == list(range(step * global_batch, (step + 1) * global_batch))  # the global batch


def test_tp_gradients_and_logits_match_a_single_process(runs, corpus, tmp_path):
    _, reports = runs
    probe = reports[0]["probe"]
    cfg = layout_config(tmp_path, corpus, 1, **{"model.tie_embeddings": False})
    model = build_seeded_model(cfg)
    ids, labels, doc_ids = grad_probe_batch()
    model(ids, labels, doc_ids=doc_ids).backward()
    grads = probe["grads"]
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        # Same fp32 math, other summation order: ~1e-7 of the gradient's scale is observed; 1e-5 leaves room
        # for larger layers and still fails a missing tp reduction (which drops half the heads' share).
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-5 * scale, msg=name)
    # QK-norm weights are shared by all heads while each tp rank holds half of them: their gradient is the
    # sum over both ranks' heads. Elementwise, not only relative to the largest entry.
    for name in ("layers.0.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"):
        torch.testing.assert_close(grads[name], dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        expected = model(ids, doc_ids=doc_ids)
    assert type(probe["logits"]) is torch.Tensor and probe["logits"].shape == expected.shape
    torch.testing.assert_close(probe["logits"], expected, rtol=1e-5, atol=1e-6)  # fp32, other reduction order


def test_tp_model_misuse_is_a_clear_error(runs):
    _, reports = runs
    loss_outside, odd_length = reports[0]["probe"]["errors"]
    assert loss_outside.startswith("RuntimeError: under tensor parallelism") and "loss_parallel_context" in loss_outside
    assert odd_length.startswith("ValueError: sequence length 15 is not divisible by parallel.tp=2")


# ----------------------------------------------------------------------------------------------- clear errors


def fake_info(world_size: int, tp: int) -> DistInfo:
    return DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"), mesh=None,
                    dp_rank=0, dp_size=world_size // tp, tp_rank=0, tp_size=tp)


def test_models_that_tp_cannot_split_are_clear_errors(tmp_path, corpus):
    cfg = layout_config(tmp_path, corpus, 4, **{"model.n_kv_heads": 2})
    with pytest.raises(ConfigError, match=r"model.n_heads=4 and model.n_kv_heads=2 .* parallel.tp=4"):
        check_parallel_shape(cfg.model, fake_info(4, 4))
    cfg = layout_config(tmp_path, corpus, 2, **{"model.vocab_size": 63})
    with pytest.raises(ConfigError, match=r"model.vocab_size=63 .* parallel.tp=2"):
        check_parallel_shape(cfg.model, fake_info(4, 2))
    cfg = layout_config(tmp_path, corpus, 2, **{"model.attention": "fused_qknorm_rope"})
    with pytest.raises(ConfigError, match=r"model.attention='fused_qknorm_rope' does not run with parallel.tp=2"):
        check_parallel_shape(cfg.model, fake_info(4, 2))
    check_parallel_shape(layout_config(tmp_path, corpus, 2).model, fake_info(4, 2))  # 4 / 2 heads split fine
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide the world size 3"):
        check_parallel_shape(layout_config(tmp_path, corpus, 2).model, fake_info(3, 2))


def test_world_size_not_divisible_by_tp_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide the world size 3"):
        init_distributed(2, "cpu")


# ----------------------------------------------------------------------------------------------- real CLI


def torchrun(nproc: int, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megasynth.train", "--config", str(config), *extra]


def cli_env() -> dict:
    path = [p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def _worker_pids(agent_pid: int) -> list[int]:
    """PIDs of the processes torchrun's agent started (its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == agent_pid:
                    pids.append(int(entry.name))
    return sorted(pids)


CLI_STEPS, CLI_SAVE_EVERY = 8, 3


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, corpus):
    """The real CLI under torchrun with tensor parallelism, 2 ranks at tp=2 (tp=2 x dp=2 itself is the 4-rank
    launch above; each torchrun launch costs seconds of start-up per rank): rank 1 SIGKILLed once a checkpoint
    exists and a later step was logged, then the same command again with --log.all_ranks=true (every rank
    says where it resumed; the flag changes no number). Both tests below check this one scenario."""
    if not trainer_enters_loss_parallel():
        pytest.skip("megasynth/train.py does not run its steps inside loss_parallel_context yet")
    root = tmp_path_factory.mktemp("torchrun")
    cfg = layout_config(root / "run", corpus, 2, **{"train.steps": CLI_STEPS, "train.eval_every": 0,
                                                     "train.checkpoint_every": CLI_SAVE_EVERY, "train.keep_last": 2})
    save_config(cfg, root / "cfg.toml")
    cmd = torchrun(2, root / "cfg.toml")
    ckpts, metrics = root / "run" / "checkpoints", root / "run" / "metrics.jsonl"
    # Files, not pipes: nobody reads them while the run goes on, and a full pipe would stall it.
    with open(root / "killed.out", "w") as out, open(root / "killed.err", "w+") as err:
        agent = subprocess.Popen(cmd, env=cli_env(), stdout=out, stderr=err)
        deadline = time.monotonic() + 180
        # Kill rank 1 once a checkpoint exists and a later step has been logged (so the rerun redoes it).
        while True:
            assert agent.poll() is None, (root / "killed.err").read_text()[-4000:]
            assert time.monotonic() < deadline
            latest = checkpoint.find_latest(ckpts)
            if latest is not None and metrics.exists():
                done = {r["step"]: r for r in read_metrics(metrics) if r["kind"] == "train"}
                if max(done, default=0) > int(latest.name[5:]):
                    break
            time.sleep(0.01)
        workers = _worker_pids(agent.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        agent.wait(timeout=120)
    before = {r["step"]: r for r in read_metrics(metrics) if r["kind"] == "train"}
    resume_step = int(checkpoint.find_latest(ckpts).name[5:])
    rerun = subprocess.run([*cmd, "--log.all_ranks=true"], env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    return {"root": root, "killed_code": agent.returncode, "killed_out": (root / "killed.out").read_text(),
            "before": before, "resume_step": resume_step, "rerun": rerun}


def test_torchrun_cli_with_tensor_parallel(killed_and_rerun):
    run_dir, rerun = killed_and_rerun["root"] / "run", killed_and_rerun["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, CLI_STEPS + 1))
    assert all(r["loss"] < 5.0 for r in records)  # finite and about ln(64) = 4.16 or lower
    latest = checkpoint.find_latest(run_dir / "checkpoints")
    assert latest.name == checkpoint.step_dir_name(CLI_STEPS)
    meta = checkpoint.read_meta(latest)
    assert (meta["world_size"], meta["tp"], meta["dp"]) == (2, 2, 1)
    model, _ = checkpoint.load_for_inference(latest)  # readable by a single process
    assert model.lm_head.weight.shape == (TINY_VOCAB, 32)
    # Rank 0 alone prints (log.all_ranks is off in the first run): each step's line appears once and nothing is
    # rank-prefixed (every console line is flushed as it is printed, so the killed run's lines are all there).
    lines = killed_and_rerun["killed_out"].splitlines()
    assert len([line for line in lines if line.startswith(f"step 2/{CLI_STEPS}")]) == 1
    assert "[rank" not in killed_and_rerun["killed_out"]


def test_killed_rank_then_rerun_resumes_from_the_last_checkpoint(killed_and_rerun):
    ckpts, rerun = killed_and_rerun["root"] / "run" / "checkpoints", killed_and_rerun["rerun"]
    assert killed_and_rerun["killed_code"] != 0  # torchrun fails the job when a rank dies
    before, resume_step = killed_and_rerun["before"], killed_and_rerun["resume_step"]
    assert resume_step < CLI_STEPS
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed_from = ckpts / checkpoint.step_dir_name(resume_step)
    assert f"[rank 0] resumed from {resumed_from} at step {resume_step}" in rerun.stdout
    assert f"[rank 1] resumed from {resumed_from} at step {resume_step}" in rerun.stdout  # every rank
    after = {r["step"]: r for r in read_metrics(killed_and_rerun["root"] / "run" / "metrics.jsonl")
             if r["kind"] == "train"}
    assert sorted(after) == list(range(1, CLI_STEPS + 1))
    # Steps the killed run finished after its last checkpoint are recomputed from the checkpoint: same layout,
    # same data position, fp32 on the CPU, so the same losses bit for bit.
    redone = [s for s in before if s > resume_step]
    assert redone
    for s in redone:
        assert after[s]["loss"] == before[s]["loss"], s


# ----------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("mode", ["selective", "full", "compile"])
def test_checkpointing_and_compile_keep_the_numbers_and_the_names(tmp_path, corpus, mode):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: PLC0415

    from megasynth.parallelize import apply_activation_checkpointing, apply_compile  # noqa: PLC0415

    cfg = layout_config(tmp_path, corpus, 1)
    plain, wrapped = build_seeded_model(cfg), build_seeded_model(cfg)
    if mode == "compile":
        apply_compile(wrapped, backend="aot_eager")  # inductor needs minutes of C++ compiles on this CPU
    else:
        apply_activation_checkpointing(wrapped, mode)
        wrapped_blocks = [name for name, block in wrapped.layers.items() if type(block).__name__ == "CheckpointWrapper"]
        assert wrapped_blocks == (["0", "1"] if mode == "full" else ["0"])
    ids, labels, doc_ids = grad_probe_batch()
    plain(ids, labels, doc_ids=doc_ids).backward()
    loss = wrapped(ids, labels, doc_ids=doc_ids)
    loss.backward()
    assert loss.item() == pytest.approx(plain(ids, labels, doc_ids=doc_ids).item(), rel=1e-6)
    # Recomputation repeats the same fp32 ops, so gradients agree to rounding (compile may fuse differently).
    for (name, p), (_, q) in zip(plain.named_parameters(), wrapped.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Checkpoint keys stay the plain model's: checkpoints load with any activation_checkpoint / compile setting.
    assert list(get_model_state_dict(wrapped)) == list(get_model_state_dict(plain))


# ----------------------------------------------------------------------------------------------- launch scripts


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_launch_scripts_build_the_torchrun_commands(tmp_path):
    """The scripts' torchrun command lines, with torchrun, srun and scontrol replaced by stubs that print."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "torchrun", 'echo torchrun "$@"')
    _stub(bin_dir, "scontrol", "printf 'gpu-node-7\\ngpu-node-8\\n'")
    # srun drops its own options and runs the task as node 1 of the allocation would.
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    launch, config = REPO / "examples" / "launch", "examples/configs/tiny.toml"

    def run(script, **extra):
        done = subprocess.run(["bash", str(launch / script), config, "--train.steps=3"], env={**env, **extra},
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        return done.returncode, done.stdout.strip(), done.stderr

    assert run("single_node.sh", NPROC="4")[:2] == (0, "torchrun --standalone --nproc_per_node=4 -m megasynth.train "
                                                   f"--config {config} --train.steps=3")
    code, out, _ = run("multi_node.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC_PER_NODE="8")
    assert code == 0 and out == ("torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --rdzv_backend=c10d "
                                 "--rdzv_endpoint=10.0.0.1:29500 --rdzv_id=megasynth -m megasynth.train "
                                 f"--config {config} --train.steps=3")
    code, _, err = run("multi_node.sh", NNODES="2", MASTER_ADDR="10.0.0.1")
    assert code == 2 and "set NODE_RANK" in err
    code, out, _ = run("slurm.sbatch", SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_JOB_ID="123456", SLURM_NNODES="2",
                       SLURM_GPUS_ON_NODE="4")
    assert code == 0 and out == ("torchrun --nnodes=2 --node_rank=1 --nproc_per_node=4 --rdzv_backend=c10d "
                                 "--rdzv_endpoint=gpu-node-7:23456 --rdzv_id=123456 -m megasynth.train "
                                 f"--config {config} --train.steps=3")
