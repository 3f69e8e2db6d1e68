"""tools/embed_corpus.py as a user runs it: a second run started while the first is in the middle of its work, the
first killed mid-run, resumed under torchrun with 2 ranks; independent workers killed and restarted; bad input.

The kill is real (a run stops itself right after a shard is saved and is SIGKILLed there); the resumed run's
EMB.npy and EMB.json must be byte-identical to an uninterrupted run's. Every process uses one torch thread, so the
float32 reductions are the same in all of them (and tiny batches gain nothing from more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_tool, write_pattern_corpus
from procfs import stopped
from synth.stdlib_prefix import write_stdlib_prefix
from workers import Zygote, chaos_workers, leftover_temps

from megasynth.synth.sbp.embed import FAULT_ENV
from megasynth.synth.sbp.embed_files import work_dir
from megasynth.work_units import published_counts

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "embed_corpus.py"
ARGS = ["--max-tokens", "16", "--batch-size", "4", "--shard-size", "5", "--no-progress"]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_stdlib_prefix(tmp_path_factory.mktemp("corpus"), num_docs=24)[0]


@pytest.fixture(scope="module")
def zygote():
    """Runs of the tool forked from one process that imported sentence-transformers once (tests/workers.py): the
    reference, the killed run and the workers, ten runs at seconds of CPU apiece as `python tools/embed_corpus.py`."""
    with Zygote(TOOL, env=env(), preload=("sentence_transformers",)) as z:
        yield z


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, zygote) -> Path:
    """REF.npy / REF.json of an uninterrupted run with ARGS' settings."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    done = zygote.run([sys.executable, str(TOOL), "--input", corpus, "--output", str(ref), *ARGS], env())
    assert done.returncode == 0 and "(0 resumed)" in done.stdout, done.stdout
    return ref


def assert_same_output(out: Path, ref: Path) -> None:
    assert out.with_suffix(".npy").read_bytes() == ref.with_suffix(".npy").read_bytes()
    got, want = (json.loads(p.with_suffix(".json").read_text()) for p in (out, ref))
    assert got["files"]["npy"].pop("name") == f"{out.name}.npy"
    assert want["files"]["npy"].pop("name") == f"{ref.name}.npy"
    assert got == want


def test_kill_then_resume_on_two_ranks_is_byte_identical(tmp_path, corpus, reference, zygote, capsys):
    out = tmp_path / "emb"
    wdir = work_dir(out)
    cmd = [sys.executable, str(TOOL), "--input", corpus, "--output", str(out), *ARGS]
    # The run stops itself right after saving its second shard (SIGSTOP: its lock held) and is SIGKILLed there.
    first = zygote.start(cmd, env(**{FAULT_ENV: "stop:2"}))
    try:
        assert stopped(first), first.communicate()
        saved = sorted(p.name for p in wdir.iterdir())
        assert saved == [".lock", "manifest.json", "shard-000000.npy", "shard-000001.npy"]
        # A second run meanwhile is refused, the same command and one with other settings (issue 19: it used to die
        # with a missing-file error once the first removed the work dir, leaving shards without a manifest that a
        # third run with other settings then adopted), and changes nothing (in this process: the lock is the other's).
        for argv in (cmd, [*cmd, "--max-tokens", "128", "--overwrite"]):
            assert load_tool("embed_corpus").main(argv[2:]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err, err
            assert err.startswith(f"{wdir}: in use by tools/embed_corpus.py (pid {first.pid} on host ")
            assert err.endswith("wait for it or use another --work-dir")
        assert sorted(p.name for p in wdir.iterdir()) == saved
    finally:
        first.kill()
    first.communicate(timeout=300)
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "emb.json").exists()

    # Resuming with settings that change the bytes is refused, naming the setting (before loading the model).
    capsys.readouterr()
    rc = load_tool("embed_corpus").main(["--input", corpus, "--output", str(out), *ARGS[:4], "--shard-size", "6",
                                         "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "shard_size: 5 then, 6 now" in err and str(wdir) in err and "\n" not in err
    # So is one with another --max-tokens (issue 19: it used to adopt the shards), naming the setting.
    rc = load_tool("embed_corpus").main(["--input", corpus, "--output", str(out), "--max-tokens", "128", *ARGS[2:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "input.max_tokens: 16 then, 128 now" in err and str(wdir) in err and "\n" not in err

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              *cmd[1:]], check=False, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(2 resumed)" in resumed.stdout and "world size 2" in resumed.stdout
    assert_same_output(out, reference)
    assert not wdir.exists()


def test_bad_input_exits_2_with_one_line(tmp_path, corpus, capsys):
    main = load_tool("embed_corpus").main

    def run(*argv) -> str:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err
        return err

    assert "neither a prefix" in run("--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "e"))
    pattern = write_pattern_corpus(tmp_path / "pattern")  # a sidecar without a tokenizer
    assert "pass --tokenizer" in run("--input", pattern, "--output", str(tmp_path / "e"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert f"{bad}:2" in run("--input", str(bad), "--output", str(tmp_path / "e"))
    (tmp_path / "e.npy").write_bytes(b"")
    assert "--overwrite" in run("--input", corpus, "--output", str(tmp_path / "e"))
    assert "--max-tokens" in run("--input", corpus, "--output", str(tmp_path / "f"), "--max-tokens", "0")


def test_independent_workers_killed_and_late_publish_the_bytes_of_one_run(tmp_path, corpus, reference, zygote):
    """Issue 21: --worker I/N processes SIGKILLed half-way through shards, restarted, a late fourth; the published
    EMB.npy/EMB.json are the uninterrupted run's, no shard was made twice, publish before the end is refused."""
    out = tmp_path / "emb"
    base = [sys.executable, str(TOOL), "--input", corpus, "--output", str(out), *ARGS]
    work = tmp_path / "emb.units"
    chaos_workers(lambda worker: [*base, "--worker", worker], 5, seed=5, work_dir=work, env=env(),
                  publish=lambda: zygote.run([*base, "--publish"], env()), start=zygote.start)
    assert_same_output(out, reference)
    assert published_counts(work / "events") == {k: 1 for k in range(5)}
    assert leftover_temps(work) == []
