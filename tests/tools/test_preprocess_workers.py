"""tools/preprocess_data.py's worker processes (issue 10): every document is tokenized whole whatever the
tokenizer.json says about truncation and padding, and the workers (and multiprocessing's resource tracker)
die with a SIGKILLed parent. Real subprocesses; children are found through /proc."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bert_tokenizer import MAX_LENGTH, reference_ids, write_bert_tokenizer
from procfs import alive, descendants

from megasynth.data.indexed import IndexedDataset
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"


@pytest.mark.parametrize("workers", [1, 2])
def test_documents_are_tokenized_whole_despite_truncation_and_padding_in_the_file(tmp_path, workers):
    tok_dir = write_bert_tokenizer(tmp_path / "bert")
    texts = ["x", "a much longer document. " * 40, "two words", "Return a new list containing the items."] * 3
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out" / "data"
    proc = subprocess.run([sys.executable, str(TOOL), "--input", str(corpus), "--tokenizer", str(tok_dir),
                           "--output-prefix", str(out), "--workers", str(workers), "--batch-size", "5",
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    eod = load_tokenizer(tok_dir).eod_id
    ds = IndexedDataset(out)
    refs = [reference_ids(tok_dir, t) for t in texts]
    assert max(map(len, refs)) > 10 * MAX_LENGTH and min(map(len, refs)) == 1
    assert [len(ds[i]) for i in range(len(texts))] == [len(r) + 1 for r in refs]  # each document's full count
    assert [ds[i].tolist() for i in range(len(texts))] == [r + [eod] for r in refs]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["tokenizer"]["whole_text"] is True
    assert sidecar["tokenizer"]["ignored_from_file"]["truncation"]["max_length"] == MAX_LENGTH
    assert sidecar["stats"]["tokens"] == sum(len(r) + 1 for r in refs)


# -- workers die with their parent ------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the children through /proc")
def test_sigkill_of_the_parent_takes_workers_and_resource_tracker_with_it(tmp_path):
    tok = train_bpe_tokenizer(["The quick brown fox jumps over the lazy dog. " * 20] * 20, tmp_path / "tok",
                              vocab_size=300)
    corpus = tmp_path / "big.jsonl"
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog, again and again. " * 30}) + "\n"
    corpus.write_text(line * 40000)  # ~75 MB: minutes of tokenizing on two workers, so it is killed mid-run
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(TOOL), "--input", str(corpus), "--tokenizer", tok.path,
                             "--output-prefix", str(tmp_path / "out" / "data"), "--workers", "2",
                             "--batch-size", "64"], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                            start_new_session=True)  # its own process group: the finally below can sweep it
    try:
        # Wait until both workers exist and results flow back (the progress bar reports a rate).
        deadline = time.monotonic() + 120
        while True:
            children = descendants(proc.pid)
            err.seek(0)
            if len(children) >= 3 and "tok/s" in err.read():  # 2 workers + the resource tracker
                break
            assert proc.poll() is None, f"preprocess_data exited early: {(tmp_path / 'stderr.txt').read_text()}"
            assert time.monotonic() < deadline, f"workers never started: {children}"
            time.sleep(0.1)
        children = descendants(proc.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in children]
        assert any(b"resource_tracker" in c for c in commands), commands
        assert sum(b"spawn_main" in c for c in commands) == 2, commands
        proc.kill()
        proc.wait()
        # Bounded poll: all of them must go (on the old code they lived on for minutes).
        deadline = time.monotonic() + 30
        while (left := {pid for pid, start in children.items() if alive(pid, start)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"orphans still alive after the parent's SIGKILL: {left}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only what this test started (its own session)
        except ProcessLookupError:
            pass
        proc.wait()
        err.close()
