"""tools/entigraph.py and tools/rephrase.py as independent workers (issue 21) against the scripted server: workers
killed half-way through units (after their requests, and in the middle of them), restarted, a late fourth; publish
refused until every unit is done, naming the missing ones; the published output is the bytes of a one-process run,
no unit was published twice, and no request for a finished item was asked twice. Budgets are split over the units."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import load_tool
from synth.openai_server import TEST_API_KEY, TEST_API_KEY_ENV
from synth.scripted_llm import ScriptedLLM, request_id
from workers import Zygote, chaos_workers, leftover_temps

from megasynth.tokenizer import train_bpe_tokenizer
from megasynth.work_units import published_counts

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["Mara", "Tomas", "the lamp", "Storm Bay"]
# Nine documents with 1 to 4 entities: 1, 2, 5 or 9 requests each (entities, pairs, at most 2 triples).
DOCS = [{"id": f"t{i}", "title": f"Tale {i}", "text": f"Tale {i}: {', '.join(NAMES[: i % 4 + 1])} by the sea."}
        for i in range(9)]
ALL_REQUESTS = 35
PREFIX_FILES = (".bin", ".idx", ".provenance.parquet")
EG = ("--max-triples-per-doc", "2", "--include-summaries")  # EntiGraph's own flags in these tests
RP = ("--styles", "plain,qa", "--samples-per-doc", "2")  # rephrase's


def reply(body: dict) -> str:
    """The same text for the same request, whichever worker asks."""
    title, step, what = request_id(body)
    if step == "entities":
        i = int(title.split()[1])
        return json.dumps({"summary": f"A summary of {title}.", "entities": NAMES[: i % 4 + 1]})
    return f"In {title}, " + " and ".join(what) + " are connected."


# Per method: its flags, the server's replies, the requests of a one-process run.
METHODS = {"entigraph": (EG, reply, ALL_REQUESTS), "rephrase": (RP, ScriptedLLM(), 9 * 2 * 2)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_workers")
    train_bpe_tokenizer([d["text"] for d in DOCS] * 10, root / "tok", vocab_size=300)
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def zygote():
    """The workers of both tools, forked from one process that imported them (tests/workers.py)."""
    with Zygote(*(str(ROOT / "tools" / f"{tool}.py") for tool in METHODS), env=dict(os.environ),
                preload=("openai", "pyarrow.parquet")) as z:
        yield z


def argv(corpus: Path, server, work: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(corpus / "docs.jsonl"), "--work-dir", str(work), "--output-prefix", str(out),
            "--tokenizer", str(corpus / "tok"), "--base-url", server.base_url, "--model", "test-model",
            "--api-key-env", TEST_API_KEY_ENV, "--max-attempts", "2", "--no-progress", *extra]


def sent(server) -> Counter:
    return Counter(request_id(r.json) + (r.json.get("seed"),) for r in server.completion_requests())


def reference(tmp_path: Path, corpus: Path, server, tool: str = "entigraph", *extra: str) -> tuple[Path, Counter]:
    """A one-process run's output and the requests it sent (each once); the server is reset afterwards."""
    out = tmp_path / "ref" / {"entigraph": "eg", "rephrase": "rp"}[tool]  # the sidecar names its provenance file
    extra = extra or EG
    assert load_tool(tool).main(argv(corpus, server, tmp_path / "W_ref", out, *extra)) == 0
    asked = sent(server)
    assert set(asked.values()) == {1}
    server.reset()
    return out, asked


def assert_same_output(out: Path, ref: Path, *, ledger: str) -> None:
    """The prefix and provenance bytes of the reference; its sidecar too, but for the ledger's totals: "same" (the
    sidecar's bytes), "resumed" (a unit taken over from a killed worker found its ledger's lines "previous"),
    "killed" (a worker killed mid-request may have ledgered a request whose record it never wrote: asked again)."""
    for suffix in PREFIX_FILES:
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{ref}{suffix}").read_bytes(), suffix
    if ledger == "same":
        assert Path(f"{out}.json").read_bytes() == Path(f"{ref}.json").read_bytes()
    ours, theirs = (json.loads(Path(f"{p}.json").read_text()) for p in (out, ref))
    if ledger == "resumed":
        assert ours["synthetic"]["llm"].pop("previous_requests") > 0
        theirs["synthetic"]["llm"].pop("previous_requests")
    elif ledger == "killed":
        assert ours["synthetic"].pop("llm")["requests"] >= theirs["synthetic"].pop("llm")["requests"]
    assert ours == theirs


def finished_in_scratch(work: Path) -> set[tuple]:
    """The request ids that have an ok record in some unit's scratch logs."""
    titles = {d["id"]: d["title"] for d in DOCS}
    done = set()
    for path in (work / "scratch").glob("u*/*.jsonl"):
        if path.name != "ledger.jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if r["ok"]:
                    ents = tuple(r.get("entities", ())) if r["step"] != "entities" else ()
                    done.add((titles[r["doc"]], r["step"], ents, None))
    return done


@pytest.mark.parametrize("tool", ["entigraph", "rephrase"])
def test_workers_killed_restarted_and_late_publish_the_bytes_of_one_run(tmp_path, corpus, openai_server, zygote,
                                                                        tool):
    """Issue 21's schedule (tests/workers.py): three workers stopped and SIGKILLed after their requests for a
    unit, publish refused naming those units, a restart killed in another unit, a restart and a late fourth."""
    flags, openai_server.reply, requests = METHODS[tool]
    ref, asked = reference(tmp_path, corpus, openai_server, tool, *flags)
    assert sum(asked.values()) == requests
    work, out = tmp_path / "W", tmp_path / "out" / ref.name
    base = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *argv(corpus, openai_server, work, out, *flags),
            "--unit-docs", "1"]

    env = dict(os.environ)  # with the server's API key
    history = chaos_workers(lambda worker: [*base, "--worker", worker], 9, seed=21, work_dir=work, env=env,
                            publish=lambda: zygote.run([*base, "--publish"], env), start=zygote.start)
    assert len(set(history.killed_units)) == 4
    assert sent(openai_server) == asked  # every request asked once: a unit killed after its requests asks none again
    assert published_counts(work / "events") == {k: 1 for k in range(9)}  # no unit published twice
    assert leftover_temps(work) == [] and list((work / "scratch").iterdir()) == []
    assert_same_output(out, ref, ledger="resumed")
    assert sum(f"wrote {out}:" in o for o in history.outputs) == 1, history.outputs  # one publisher
    # Later workers and a publish have nothing to do.
    again = subprocess.run([*base, "--worker", "1/3"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already published" in again.stdout, again.stdout + again.stderr
    assert len(openai_server.completion_requests()) == requests
    for f in work.rglob("*"):
        if f.is_file():
            assert TEST_API_KEY.encode() not in f.read_bytes(), f


def test_a_worker_killed_mid_unit_resumes_without_asking_again(tmp_path, corpus, openai_server):
    openai_server.reply = reply
    ref, asked = reference(tmp_path, corpus, openai_server)
    openai_server.delay_s = 0.2
    work, out = tmp_path / "W", tmp_path / "out" / "eg"
    args = [*argv(corpus, openai_server, work, out, *EG), "--unit-docs", "5", "--worker", "0/1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "entigraph.py"), *args, "--concurrency", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(openai_server.completion_requests()) < 8 and proc.poll() is None:  # in unit 0's relations
        assert time.monotonic() < deadline, "the worker sent too few requests"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = finished_in_scratch(work)
    assert 0 < len(done) < ALL_REQUESTS and not (work / "units" / "u000000").exists()

    openai_server.delay_s = 0.0
    openai_server.reset()
    assert load_tool("entigraph").main(args) == 0  # the next worker resumes unit 0 from its scratch
    assert sent(openai_server) == Counter(set(asked) - done)  # exactly the unfinished requests, each once
    assert_same_output(out, ref, ledger="killed")
    assert published_counts(work / "events") == {0: 1, 1: 1}


def test_budget_is_split_over_units_and_publish_names_what_is_missing(tmp_path, corpus, openai_server, capsys):
    openai_server.reply = reply
    ref, asked = reference(tmp_path, corpus, openai_server)
    tool = load_tool("entigraph")
    work, out = tmp_path / "W", tmp_path / "out" / "eg"

    def run(*extra: str) -> tuple[int, str, str]:
        try:
            code = tool.main([*argv(corpus, openai_server, work, out, *EG), "--unit-docs", "3", *extra])
        except SystemExit as e:  # argparse's error()
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, _, err = run("--publish")  # before any worker: every unit missing
    assert code == 2 and "all 3 units are missing" in err and "Traceback" not in err, err
    # 3 tokens, 1 per unit: each unit sends its entity requests (nothing spent yet), then stops before relations.
    code, _, err = run("--worker", "0/2", "--budget-tokens", "3")
    assert code == 3, err
    assert "made 0 of 3 units" in err and "units 0, 1, 2 stopped by the budget" in err and "1 tokens each" in err
    assert not (work / "units" / "u000000").exists()
    code, _, err = run("--publish")
    assert code == 2 and "3 of 3 units not done yet (units 0, 1, 2)" in err, err
    code, _, err = run("--worker", "1/2", "--unit-docs", "2")
    assert code == 2 and "other settings (unit_docs: 3 then, 2 now)" in err.splitlines()[0], err
    code, _, err = run("--worker", "1/2", "--budget-tokens", "1000000", "--no-publish")  # resumes all three
    assert code == 0 and sent(openai_server) == asked, err
    assert not Path(f"{out}.idx").exists()
    code, stdout, err = run("--publish")
    assert code == 0 and f"wrote {out}:" in stdout, err
    assert_same_output(out, ref, ledger="resumed")
    for flags, message in ((["--publish", "--no-publish"], "contradict"), (["--no-publish"], "needs --worker"),
                           (["--worker", "2/2"], "0 <= I < N"), (["--worker", "0/2", "--unit-docs", "0"], ">= 1")):
        code, _, err = run(*flags)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (flags, err)


def test_failed_items_leave_their_unit_unpublished_until_allow_partial(tmp_path, corpus, openai_server, capsys):
    def broken(body: dict) -> str:  # Tale 4's entity replies are never valid JSON
        return '{"summary": "cut off' if request_id(body)[:2] == ("Tale 4", "entities") else reply(body)

    openai_server.reply = broken
    tool = load_tool("entigraph")
    work, out = tmp_path / "W", tmp_path / "out" / "eg"
    args = [*argv(corpus, openai_server, work, out, *EG), "--unit-docs", "3", "--worker", "0/1"]
    assert tool.main(args) == 4
    err = capsys.readouterr().err
    assert "made 2 of 3 units" in err and "units 1 left unpublished" in err, err
    assert "missing entities items (permanent" in err and "invalid_json 1" in err and "Traceback" not in err, err
    assert (work / "units" / "u000002").is_dir() and not (work / "units" / "u000001").exists()
    asked = len(openai_server.completion_requests())
    assert tool.main(args) == 4  # a plain rerun does not ask for a permanent failure again
    assert len(openai_server.completion_requests()) == asked
    capsys.readouterr()
    assert tool.main([*args, "--allow-partial"]) == 0  # publishes unit 1 with its failed item, then the output
    assert len(openai_server.completion_requests()) == asked
    side = json.loads(Path(f"{out}.json").read_text())["synthetic"]
    assert side["partial"] and side["missing"]["permanent"] == {"entities": {"invalid_json": 1}}
    assert side["counts"]["documents"] == 9 and side["counts"]["failed"]["entities"] == {"invalid_json": 1}
    assert side["llm"]["failed"] == {"invalid_json": 1} and side["llm"]["requests"] == asked - 1  # units' ledgers
    assert published_counts(work / "events") == {0: 1, 1: 1, 2: 1}


def test_rephrase_two_workers_at_once_then_publish_the_bytes_of_one_run(tmp_path, corpus, openai_server, zygote,
                                                                        capsys):
    openai_server.reply = ScriptedLLM()
    ref, asked = reference(tmp_path, corpus, openai_server, "rephrase", *RP)
    assert sum(asked.values()) == 9 * 2 * 2
    work, out = tmp_path / "W", tmp_path / "out" / "rp"
    args = [*argv(corpus, openai_server, work, out, *RP), "--unit-docs", "2"]
    openai_server.delay_s = 0.05
    tool = [sys.executable, str(ROOT / "tools" / "rephrase.py"), *args, "--no-publish", "--worker"]
    procs = [zygote.start([*tool, w], dict(os.environ)) for w in ("0/2", "1/2")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[0]
    assert sent(openai_server) == asked and not Path(f"{out}.idx").exists()
    rephrase = load_tool("rephrase")
    assert rephrase.main([*args, "--publish"]) == 0
    assert published_counts(work / "events") == {k: 1 for k in range(5)}
    assert_same_output(out, ref, ledger="same")  # sidecar included
    # A token target spans every document: refused as work units, before any request.
    openai_server.reset()
    capsys.readouterr()
    assert rephrase.main([*args, "--worker", "0/1", "--target-tokens", "100", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cannot be split into work units" in err and openai_server.completion_requests() == []
