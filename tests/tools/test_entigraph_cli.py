"""tools/entigraph.py as a user runs it: a real subprocess killed with SIGKILL mid-run and started again sends
only the requests that had not finished and ends with the same bytes as an uninterrupted run; exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import load_tool
from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV, Fault
from synth.scripted_llm import DOCS, ScriptedLLM, request_id

from megasynth.tokenizer import train_bpe_tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "entigraph.py"
ALL_REQUESTS = 3 + 9 + 3  # tests/synth/test_entigraph.py explains the count


@pytest.fixture
def setup(tmp_path, openai_server):
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, tmp_path / "tok", vocab_size=300)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    openai_server.reply = ScriptedLLM()

    def argv(work: str, out: str, *extra: str) -> list[str]:
        return ["--input", str(tmp_path / "docs.jsonl"), "--work-dir", str(tmp_path / work), "--output-prefix",
                str(tmp_path / out), "--tokenizer", str(tmp_path / "tok"), "--base-url", openai_server.base_url,
                "--model", "test-model", "--api-key-env", TEST_API_KEY_ENV, "--max-triples-per-doc", "2",
                "--include-summaries", "--max-attempts", "3", "--no-progress", *extra]
    return argv


def finished_requests(work: Path) -> set[tuple]:
    """The request ids (title, step, entities) that have a record in the work dir."""
    titles = {d["id"]: d["title"] for d in DOCS}
    done = set()
    for name in ("entities.jsonl", "relations.jsonl"):
        path = work / name
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                done.add((titles[r["doc"]], r["step"], tuple(r.get("entities", ())) if r["step"] != "entities" else ()))
    return done


def test_killed_runs_resume_without_repeats_and_match_an_uninterrupted_run(tmp_path, openai_server, setup):
    tool = load_tool("entigraph")
    assert tool.main(setup("W_ref", "ref/eg")) == 0
    reference = Counter(request_id(r.json) for r in openai_server.completion_requests())
    assert len(reference) == sum(reference.values()) == ALL_REQUESTS

    openai_server.delay_s = 0.2  # slow enough that the kill lands mid-run even on a loaded machine
    for kill_after in (2, 8):  # during the entity step, then among the relations
        openai_server.reset()
        before = finished_requests(tmp_path / "W")
        proc = subprocess.Popen([sys.executable, str(TOOL), *setup("W", "out/eg", "--concurrency", "2")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(openai_server.completion_requests()) < kill_after and proc.poll() is None:
            assert time.monotonic() < deadline, "the tool sent too few requests"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        sent = [request_id(r.json) for r in openai_server.completion_requests()]
        assert not set(sent) & before  # nothing finished earlier was asked again
    done = finished_requests(tmp_path / "W")
    assert 0 < len(done) < ALL_REQUESTS

    openai_server.delay_s = 0.0
    openai_server.reset()
    assert tool.main(setup("W", "out/eg")) == 0  # started again (in-process: the kills above were the real test)
    resumed = Counter(request_id(r.json) for r in openai_server.completion_requests())
    assert resumed == Counter(set(reference) - done)  # exactly the unfinished requests, each once

    for suffix in (".bin", ".idx", ".provenance.parquet"):
        assert (tmp_path / f"out/eg{suffix}").read_bytes() == (tmp_path / f"ref/eg{suffix}").read_bytes(), suffix
    ours, ref = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("out/eg", "ref/eg"))
    ours["synthetic"].pop("llm"), ref["synthetic"].pop("llm")  # the killed runs spent more
    assert ours == ref
    for name in ("relations.jsonl", "entities.jsonl"):
        keys = [json.loads(line)["key"] for line in (tmp_path / "W" / name).read_text().splitlines()]
        assert len(keys) == len(set(keys))  # no duplicated output
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert TEST_API_KEY.encode() not in f.read_bytes(), f


def test_exit_codes_budget_and_existing_output(tmp_path, openai_server, setup, capsys):
    tool = load_tool("entigraph")
    assert tool.main(setup("W", "out/eg", "--budget-tokens", "300")) == 3
    err = capsys.readouterr().err
    assert "stopped by the budget" in err and not (tmp_path / "out/eg.idx").exists()
    assert tool.main(setup("W", "out/eg", "--budget-tokens", "100000")) == 0
    capsys.readouterr()
    assert tool.main(setup("W", "out/eg")) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "Traceback" not in err
    assert tool.main(setup("W", "out/eg", "--overwrite", "--max-triples-per-doc", "1")) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_run_where_everything_fails_says_so_and_retry_failed_recovers(tmp_path, openai_server, setup, capsys):
    tool = load_tool("entigraph")
    # Not retried: per document one request with response_format and, --structured-output auto, the same one
    # without it at once (a server may refuse the field, not the request); refused too, the item fails.
    openai_server.reply = lambda body: Fault.status(400)
    assert tool.main(setup("W", "out/eg")) == 4  # items left out: nothing published (issue 19)
    err = capsys.readouterr().err
    assert "missing entities items (permanent" in err and "http_400 3" in err and "--retry-failed" in err
    assert "Traceback" not in err and not (tmp_path / "out/eg.idx").exists()
    assert len(openai_server.completion_requests()) == 6
    assert tool.main(setup("W", "out/eg", "--allow-partial")) == 2  # nothing at all to publish
    err = capsys.readouterr().err
    assert "nothing to write" in err and "http_400" in err and "Traceback" not in err
    assert len(openai_server.completion_requests()) == 6  # a plain rerun does not ask for permanent failures
    openai_server.reply = ScriptedLLM()
    openai_server.reset()
    assert tool.main(setup("W", "out/eg", "--retry-failed")) == 0
    assert len(openai_server.completion_requests()) == ALL_REQUESTS

