"""tools/synthesize.py as a user runs it: a real process SIGKILLed mid-run (at a random moment from outside, after
the provenance table, halfway through publishing the prefix) and started again publishes the bytes of an
uninterrupted run; a finished run killed before it removed its work directory completes on a rerun; a second
run on the same output prefix or work directory, started while the first is in the middle of its work, is
refused and the first one's output is intact; bad input (flags of one backend given to another, --backend vllm
under torchrun or without vLLM installed, ...) exits 2 with one line."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_tool
from procfs import stopped
from sbp_helpers import make_corpus, make_synthesizer, make_tokenizer
from workers import Zygote, chaos_workers, leftover_temps

from megasynth.data.prefix import FAULT_ENV as PUBLISH_FAULT_ENV
from megasynth.synth.sbp.shards import FAULT_ENV as SYNTH_FAULT_ENV
from megasynth.work_units import published_counts

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "synthesize.py"
NUM_DOCS, SHARD = 24, 4


@pytest.fixture(scope="module")
def tool():
    return load_tool("synthesize")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module, in this process or not, on one torch thread: the same float reductions in all of
    them, and no CPU spent by a second thread spinning for work in a tiny model (most of the time at two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tool, one_thread):
    d = tmp_path_factory.mktemp("synth_cli")
    tok = make_tokenizer(d / "tok")
    corpus = make_corpus(d / "data" / "real", tok)
    run = make_synthesizer(d / "run", tok, corpus)
    ref = d / "ref" / "syn"
    assert tool.main(args(run, corpus, ref)) == 0  # the uninterrupted run
    return run, corpus, ref


@pytest.fixture(scope="module")
def zygote(one_thread):
    """Runs of the tool forked from one process that imported it (torch: seconds of CPU per `python TOOL`) once
    (tests/workers.py): the workers, and the first run that a second one finds busy."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    with Zygote(TOOL, env=env) as z:
        yield z


def args(run, corpus, out, *extra):
    return ["--checkpoint", str(run), "--corpus", corpus, "--output-prefix", str(out), "--num-docs", str(NUM_DOCS),
            "--shard-docs", str(SHARD), "--max-seed-tokens", "6", "--max-new-tokens", "12", "--seed", "3",
            "--batch-size", "3", "--device", "cpu", "--no-progress", *map(str, extra)]


def output_bytes(prefix) -> dict:
    out = {ext: hashlib.sha256(Path(f"{prefix}.{ext}").read_bytes()).hexdigest()
           for ext in ("bin", "idx", "provenance.parquet")}
    meta = json.loads(Path(f"{prefix}.json").read_text())
    meta["provenance"].pop("file")  # the output's own name
    out["json"] = meta
    return out


def start(argv, **env):
    # The killed run computes its shards with the thread count of the in-process runs it is compared with.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, str(TOOL), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kill", ["random", "provenance", "json-renamed"])
def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_run(tool, setup, tmp_path, kill):
    run, corpus, ref = setup
    out = tmp_path / "syn"
    work = Path(f"{out}.work")
    if kill == "random":  # SIGKILL from outside once two shards are on disk, whatever the process is doing
        proc = start(args(run, corpus, out))
        deadline = time.monotonic() + 120
        while not (work / "shard_000001.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        done = len(list(work.glob("shard_*.npz")))
        assert 2 <= done < NUM_DOCS // SHARD  # killed midway: some shards done, some not
    else:  # a fault point: right after the provenance table, or in the prefix's publish (.bin and .json renamed)
        env = {SYNTH_FAULT_ENV: kill} if kill == "provenance" else {PUBLISH_FAULT_ENV: kill}
        proc = start(args(run, corpus, out), **env)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, err
        assert not Path(f"{out}.idx").exists() and len(list(work.glob("shard_*.npz"))) == NUM_DOCS // SHARD
    assert tool.main(args(run, corpus, out)) == 0  # the same command again
    assert output_bytes(out) == output_bytes(ref)
    assert not work.exists()


def test_a_finished_run_whose_work_dir_remains_completes_on_a_rerun(tool, setup, tmp_path, capsys):
    run, corpus, ref = setup
    out = tmp_path / "syn"
    assert tool.main(args(run, corpus, out, "--keep-work")) == 0  # as if killed after publishing
    capsys.readouterr()
    assert tool.main(args(run, corpus, out)) == 0
    assert "already complete" in capsys.readouterr().out
    assert not Path(f"{out}.work").exists() and output_bytes(out) == output_bytes(ref)
    assert tool.main(args(run, corpus, out)) == 2  # without a work dir it is an existing output like any other
    assert "--overwrite" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_or_work_dir_is_refused(tool, setup, zygote, tmp_path, capsys):
    # Issue 19: with another --work-dir and the same --output-prefix both runs exited 0, the second silently
    # replacing the first's output. The first run is stopped (SIGSTOP, its locks held) after its second shard.
    run, corpus, ref = setup
    out, work, other = tmp_path / "syn", tmp_path / "a.work", tmp_path / "other"
    first = zygote.start([sys.executable, str(TOOL), *args(run, corpus, out, "--work-dir", work)],
                         {**zygote.env, SYNTH_FAULT_ENV: "stop:shard:1"})
    try:
        assert stopped(first), first.communicate()
        capsys.readouterr()
        # Another work dir and the same output; the same work dir and another output (in this process: the locks
        # are the other process's).
        for second, name, flag in ((args(run, corpus, out, "--work-dir", tmp_path / "b.work"), out, "--output-prefix"),
                                   (args(run, corpus, other, "--work-dir", work), work, "--work-dir")):
            assert tool.main(second) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err, err
            assert err.startswith(f"error: {name}: in use by tools/synthesize.py (pid {first.pid} on host "), err
            assert err.endswith(f"wait for it or use another {flag}"), err
    finally:
        first.send_signal(signal.SIGCONT)
    printed = first.communicate(timeout=180)[0]
    assert first.returncode == 0, printed
    assert output_bytes(out) == output_bytes(ref)
    # Nothing of the refused runs, no lock file beside the output, no work dir left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"syn.{ext}" for ext in
                                                                ("bin", "idx", "json", "provenance.parquet"))


@pytest.mark.parametrize("case, message", [
    ("zero_docs", "--num-docs must be >= 1, got 0"),
    ("negative_docs", "--num-docs must be >= 1, got -5"),
    ("no_size", "give exactly one of --num-docs and --tokens"),
    ("both_sizes", "give exactly one of --num-docs and --tokens"),
    ("no_separator", "tools/train_tokenizer.py --chat-tokens"),
    ("no_checkpoint", "no complete checkpoint here"),
    ("endpoint_alone", "--endpoint and --served-model go together"),
    ("too_long", "must fit the model's max_seq_len 48"),
    ("endpoint_backend_without_url", "--backend endpoint needs --endpoint URL and --served-model NAME"),
    ("endpoint_with_vllm", "--endpoint/--served-model are for --backend endpoint, not --backend vllm"),
    ("vllm_flag_with_ours", "--vllm-tensor-parallel-size is a setting of --backend vllm, not of --backend ours"),
    ("vllm_flag_with_endpoint", "--vllm-prefix-caching is a setting of --backend vllm, not of --backend endpoint"),
    ("vllm_bad_tp", "--vllm-tensor-parallel-size must be >= 1, got 0"),
    ("vllm_under_torchrun", "--backend vllm runs one engine in one process, not under torchrun"),
    ("vllm_missing", "--backend vllm: vLLM is not installed in this Python"),
])
def test_bad_input_exits_2_with_one_line(tool, setup, tmp_path, capsys, monkeypatch, case, message):
    run, corpus, _ = setup
    argv = args(run, corpus, tmp_path / "out")
    endpoint = ["--endpoint", "http://127.0.0.1:9/v1", "--served-model", "m"]
    if case in ("zero_docs", "negative_docs"):
        argv[argv.index("--num-docs") + 1] = "0" if case == "zero_docs" else "-5"
    elif case == "no_size":
        i = argv.index("--num-docs")
        del argv[i:i + 2]
    elif case == "both_sizes":
        argv += ["--tokens", "100"]
    elif case == "no_separator":
        plain = make_tokenizer(tmp_path / "plain", separator=False)
        plain_corpus = make_corpus(tmp_path / "plain_corpus", plain)
        argv = args(make_synthesizer(tmp_path / "plain_run", plain, plain_corpus), plain_corpus, tmp_path / "out")
    elif case == "no_checkpoint":
        argv[argv.index("--checkpoint") + 1] = str(tmp_path)
    elif case == "endpoint_alone":
        argv += ["--endpoint", "http://127.0.0.1:9/v1"]
    elif case == "too_long":
        argv[argv.index("--max-new-tokens") + 1] = "60"
    elif case == "endpoint_backend_without_url":
        argv += ["--backend", "endpoint"]
    elif case == "endpoint_with_vllm":
        argv += ["--backend", "vllm", *endpoint]
    elif case == "vllm_flag_with_ours":
        argv += ["--vllm-tensor-parallel-size", "2"]
    elif case == "vllm_flag_with_endpoint":
        argv += [*endpoint, "--no-vllm-prefix-caching"]
    elif case == "vllm_bad_tp":
        argv += ["--backend", "vllm", "--vllm-tensor-parallel-size", "0"]
    elif case == "vllm_under_torchrun":
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv += ["--backend", "vllm"]
    elif case == "vllm_missing":
        if importlib.util.find_spec("vllm") is not None:
            pytest.skip("vLLM is installed in this Python (tests/vllm_engine runs the backend)")
        argv += ["--backend", "vllm"]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.glob("out*"))
    if case == "vllm_missing":  # and the line says how to install it
        assert "pip install 'megasynth[vllm]'" in err and "make vllm-venv" in err, err


# -- independent workers (issue 21) -------------------------------------------------------------------------------
def test_independent_workers_killed_and_late_publish_the_bytes_of_one_run(setup, zygote, tmp_path):
    """--worker I/N processes SIGKILLed half-way through shards, restarted, a late fourth: the published prefix and
    provenance are the uninterrupted run's, no shard was made twice, publish before the end is refused. The workers
    are forked from a zygote that imported the tool (torch) once (tests/workers.py)."""
    run, corpus, ref = setup
    out = tmp_path / "syn"
    work = Path(f"{out}.work")
    base = [sys.executable, str(TOOL), *args(run, corpus, out)]
    chaos_workers(lambda worker: [*base, "--worker", worker], NUM_DOCS // SHARD, seed=8, work_dir=work,
                  env=zygote.env, publish=lambda: zygote.run([*base, "--publish"], zygote.env), start=zygote.start)
    assert output_bytes(out) == output_bytes(ref)
    assert published_counts(work / "events") == {k: 1 for k in range(NUM_DOCS // SHARD)}
    assert leftover_temps(work) == []


def test_ray_launcher_synthesizes_on_a_local_ray_and_publishes_the_same_bytes(setup, tmp_path, capsys):
    pytest.importorskip("ray", reason="the optional `ray` extra is not installed (pip install 'megasynth[ray]')")
    run, corpus, ref = setup
    out = tmp_path / "ray" / "syn"
    code = load_tool("run_on_ray").main(["--workers", "3", "--num-cpus", "2", "synthesize", "--",
                                         *args(run, corpus, out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert all(f"worker {i}/3: worker {i}/3: made" in printed for i in range(3)), printed
    assert output_bytes(out) == output_bytes(ref)
    assert published_counts(Path(f"{out}.work") / "events") == {k: 1 for k in range(NUM_DOCS // SHARD)}


def test_token_target_workers_finish_rounds_and_publish_the_bytes_of_one_run(tool, setup, zygote, tmp_path):
    """--tokens T with workers: shards come in rounds of a fixed size, so which shards form the output (0..m, m the
    first at which T is reached) does not depend on the workers."""
    run, corpus, _ = setup

    def token_args(out):
        argv = args(run, corpus, out)
        i = argv.index("--num-docs")
        return [*argv[:i], "--tokens", "300", *argv[i + 2:]]

    ref = tmp_path / "ref" / "syn"
    assert tool.main(token_args(ref)) == 0
    out = tmp_path / "syn"
    base = [sys.executable, str(TOOL), *token_args(out)]
    procs = [zygote.start([*base, "--worker", w], zygote.env) for w in ("0/2", "1/2")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert output_bytes(out) == output_bytes(ref)
    shards = json.loads(Path(f"{out}.json").read_text())["synthesis"]["counts"]["shards"]
    rounds = sorted(p.name for p in Path(f"{out}.work").iterdir() if p.name.startswith("r0"))
    assert shards > 8 and rounds == ["r0000", "r0001"][: -(-shards // 8)], (shards, rounds)  # two rounds needed
    counts = {}
    for r in rounds:
        for k, n in published_counts(Path(f"{out}.work") / r / "events").items():
            counts[(r, k)] = n
    assert set(counts.values()) == {1} and len(counts) == 8 * len(rounds)
