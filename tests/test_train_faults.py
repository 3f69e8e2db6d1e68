"""Faults the trainer must survive (issue 10): two trainers on one run directory, a non-finite last step, and
data or a tokenizer that does not fit model.vocab_size. The lock is tested with real processes (a trainer
holding it, another refused, then the holder SIGKILLed) and across two gloo ranks."""

import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from dist import run_on_ranks, start_process
from helpers import TINY_VOCAB, pattern_documents, tiny_config, write_pattern_corpus

from megasynth import checkpoint
from megasynth.config import save_config
from megasynth.data.indexed import IndexedDatasetWriter, smallest_token_dtype
from megasynth.metrics import read_metrics
from megasynth.run_lock import LOCK_NAME, RunDirBusy, acquire_run_lock
from megasynth.train import main, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_pattern_corpus(tmp_path_factory.mktemp("corpus") / "train")


def write_config(tmp_path, name, prefix, **overrides) -> Path:
    cfg = tiny_config(tmp_path / "run", prefix, **overrides)
    save_config(cfg, tmp_path / f"{name}.toml")
    return tmp_path / f"{name}.toml"


# ----------------------------------------------------------------------------------------------- run-dir lock


def test_the_lock_is_exclusive_and_released(tmp_path):
    lock = acquire_run_lock(tmp_path / "run")
    # flock belongs to an open file: a second open, even in this process, is refused.
    with pytest.raises(RunDirBusy, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        acquire_run_lock(tmp_path / "run")
    lock.release()
    lock.release()  # idempotent
    with acquire_run_lock(tmp_path / "run"):
        pass


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # Data-loader workers are forked while the trainer holds the lock; the lock must not outlive the trainer
    # in them (a flock belongs to the open file, which a fork shares).
    ctx = multiprocessing.get_context("fork")
    started, done = ctx.Event(), ctx.Event()
    lock = acquire_run_lock(tmp_path / "run")
    child = ctx.Process(target=lambda: (started.set(), done.wait(60)))
    child.start()
    try:
        assert started.wait(60)  # the child runs (its fork hooks have run)
        lock.release()
        with acquire_run_lock(tmp_path / "run"):  # refused if the live child still held a reference
            assert child.is_alive()
    finally:
        done.set()
        child.join()


def test_a_second_trainer_is_refused_and_the_lock_dies_with_the_first(tmp_path, corpus, capsys):
    # Two processes: a trainer started in a process of its own (tests/dist.py) holds the run directory; this
    # test process is the second.
    run_dir, first_err = tmp_path / "run", tmp_path / "first.err"
    first_cfg = write_config(tmp_path, "first", corpus, **{"train.steps": 100_000})
    first = start_process(main, ["--config", str(first_cfg)], stdout=os.devnull, stderr=first_err)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir / "metrics.jsonl"):
            assert first.is_alive(), first_err.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config_before = (run_dir / "config.toml").read_bytes()

        # Another trainer, another config, the same run directory: refused before it writes anything.
        second_cfg = write_config(tmp_path, "second", corpus, **{"train.steps": 3, "train.seed": 7})
        assert main(["--config", str(second_cfg)]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and captured.out == ""
        assert f"is in use by another trainer (pid {first.pid} on host {socket.gethostname()}" in captured.err
        assert first.is_alive()  # the first run goes on, its files untouched
        assert (run_dir / "config.toml").read_bytes() == config_before
        assert read_metrics(run_dir / "metrics.jsonl")[0]["step"] == 1  # a fresh run would have restarted the file
    finally:
        first.kill()
        first.join()
    assert first.exitcode == -signal.SIGKILL
    # The kernel dropped the killed run's lock: the next run takes it (nothing to clean up by hand).
    assert main(["--config", str(write_config(tmp_path, "third", corpus, **{"train.steps": 2}))]) == 0
    assert f"pid {os.getpid()} " in (run_dir / LOCK_NAME).read_text()


def _train_on_ranks(cfg):
    return train(cfg)


def test_every_rank_learns_of_a_refusal(tmp_path, corpus):
    cfg = tiny_config(tmp_path / "run", corpus, **{"train.steps": 2})
    with acquire_run_lock(tmp_path / "run"):  # held by this process, so rank 0's attempt fails
        # Without the broadcast, rank 1 would wait for rank 0 in a collective until the timeout.
        assert run_on_ranks(_train_on_ranks, 2, cfg, timeout=120) == [2, 2]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------- non-finite end


def test_a_nonfinite_last_step_still_ends_with_a_final_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("MEGASYNTH_FAULT_NAN_AT_STEP", "6")
    cfg_path = write_config(tmp_path, "run", corpus, **{"train.steps": 6, "train.checkpoint_every": 4,
                                                         "train.max_nonfinite_steps": 2})
    assert main(["--config", str(cfg_path)]) == 0
    run_dir = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [4, 6]
    assert checkpoint.read_meta(checkpoint.find_latest(run_dir / "checkpoints"))["step"] == 6
    # The weights are those of the last good update: AdamW took 5 steps, and they are finite.
    model, _ = checkpoint.load_for_inference(run_dir)
    opt = torch.optim.AdamW(model.parameters())
    parts = checkpoint.load_checkpoint(run_dir, model=model, optimizer=opt)
    assert parts["progress"]["step"] == 6 and parts["progress"]["nonfinite_total"] == 1
    assert {float(s["step"]) for s in opt.state_dict()["state"].values()} == {5.0}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    # A rerun finds the run finished: no step repeated, no new checkpoint.
    assert main(["--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 6" in out and "done: 6 steps" in out
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [4, 6]


# ----------------------------------------------------------------------------------------------- vocabulary


def write_prefix(prefix: Path, docs, metadata: dict | None) -> str:
    """A prefix holding `docs`; metadata None makes a Megatron-style prefix (no sidecar)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(str(prefix), smallest_token_dtype(1000), metadata=metadata or {}) as writer:
        writer.add_documents(docs)
    if metadata is None:
        Path(f"{prefix}.json").unlink()
    return str(prefix)


def refusal(tmp_path, capsys, prefix, **overrides) -> str:
    code = main(["--config", str(write_config(tmp_path, "cfg", prefix, **overrides))])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
    return captured.err


def test_data_ids_past_the_vocabulary_are_refused_before_any_step(tmp_path, capsys):
    docs = pattern_documents(vocab_size=100, seed=1)  # ids up to 99 (of a 100-id tokenizer), model vocab 64
    top = max(int(d.max()) for d in docs)
    megatron = write_prefix(tmp_path / "data" / "megatron", docs, None)
    err = refusal(tmp_path, capsys, megatron)
    assert err == (f"error: {megatron}: its largest token id is {top} but model.vocab_size={TINY_VOCAB} (ids must "
                   f"be below it); set --model.vocab_size={top + 1} (or more), or re-tokenize the data\n")
    # A held-out prefix is checked too.
    good = write_pattern_corpus(tmp_path / "data" / "good")
    err = refusal(tmp_path, capsys, good, **{"data.valid_paths": [megatron]})
    assert err.startswith(f"error: {megatron}: its largest token id is {top}")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys):
    docs = pattern_documents(vocab_size=TINY_VOCAB)  # every id fits the model ...
    prefix = write_prefix(tmp_path / "data" / "bigtok", docs, {"vocab_size": 100, "eod_id": 0})  # ... its tokenizer not
    err = refusal(tmp_path, capsys, prefix)
    assert err == (f"error: {prefix}: its tokenizer has 100 ids (sidecar {prefix}.json) but "
                   f"model.vocab_size={TINY_VOCAB}; set --model.vocab_size=100 (or more)\n")
    # A model vocabulary larger than the tokenizer's is fine (e.g. padded to a multiple of 64).
    assert main(["--config", str(write_config(tmp_path, "ok", prefix, **{"model.vocab_size": 128,
                                                                           "train.steps": 1}))]) == 0
