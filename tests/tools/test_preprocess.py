"""tools/preprocess_data.py run as a user runs it (subprocesses): round trip, determinism, bad input, sidecar;
and megasynth.data.preprocess.preprocess, the library call behind it."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from megasynth.data.indexed import IndexedDataset
from megasynth.data.preprocess import preprocess
from megasynth.data.readers import ReaderOptions
from megasynth.tokenizer import train_bpe_tokenizer, train_sentencepiece_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [topics[k] for k in sorted(topics)][:60] + ["short one", "ünïcödé 🎉\n\ttabs  and  spaces "]


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe = train_bpe_tokenizer(TEXTS, d / "bpe", vocab_size=800)
    sp = train_sentencepiece_tokenizer(TEXTS, d / "sp", vocab_size=600, threads=1)
    return bpe, sp


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL file: the texts, with an empty and a whitespace-only document at lines 3 and 8."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rows = [{"text": t, "n": i} for i, t in enumerate(TEXTS)]
    rows.insert(2, {"text": ""})
    rows.insert(7, {"text": " \n "})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_round_trip_and_sidecar(tmp_path, corpus, tokenizers):
    bpe, _ = tokenizers
    out = tmp_path / "out" / "nested" / "data"  # neither directory exists: the tool creates both
    proc = run_tool("--input", corpus, "--tokenizer", bpe.path, "--output-prefix", out, "--workers", 2,
                    "--batch-size", 7)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(TEXTS):,} documents" in proc.stdout and "skipped 2 empty and 0 bad" in proc.stdout
    ds = IndexedDataset(out)
    assert len(ds) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        ids = ds[i].tolist()
        assert ids[-1] == bpe.eod_id and bpe.eod_id not in ids[:-1]
        assert bpe.decode(ids[:-1]) == text
    assert ds[0].dtype == np.uint16  # vocab 800 fits
    meta = ds.metadata
    assert meta["tokenizer"] == bpe.identity()
    assert (meta["vocab_size"], meta["eod_id"], meta["append_eod"], meta["add_bos"]) == (800, 0, True, False)
    assert meta["created_by"] == "preprocess_data"
    data = corpus.read_bytes()
    assert meta["sources"] == [{"path": str(corpus.resolve()), "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}]
    assert meta["stats"] == {"documents": len(TEXTS), "tokens": ds.num_tokens, "skipped_empty": 2, "skipped_bad": 0}
    assert meta["num_tokens"] == sum(len(bpe.encode(t)) + 1 for t in TEXTS)
    assert files_in(out.parent) == ["data.bin", "data.idx", "data.json"]  # no temp files


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path, corpus, tokenizers):
    bpe, _ = tokenizers
    outputs = []
    for workers in (0, 1, 2):
        prefix = tmp_path / f"w{workers}"
        proc = run_tool("--input", corpus, "--tokenizer", bpe.path, "--output-prefix", prefix,
                        "--workers", workers, "--batch-size", 5, "--no-progress")
        assert proc.returncode == 0, proc.stderr
        outputs.append([Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx", "json")])
    assert outputs[0] == outputs[1] == outputs[2]  # the sidecar holds no timings


def test_bos_without_eod_and_sentencepiece(tmp_path, corpus, tokenizers):
    _, sp = tokenizers
    proc = run_tool("--input", corpus, "--tokenizer", Path(sp.path) / "tokenizer.model", "--output-prefix",
                    tmp_path / "sp", "--add-bos", "--no-append-eod", "--workers", 1, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(tmp_path / "sp")
    for i in (0, len(TEXTS) - 1):
        assert ds[i].tolist() == [sp.bos_id] + sp.encode(TEXTS[i])
    assert (ds.metadata["append_eod"], ds.metadata["add_bos"], ds.metadata["eod_id"]) == (False, True, 2)
    # The byte-level BPE tokenizer has no BOS: asking for one is an input error, not a crash.
    bpe_proc = run_tool("--input", corpus, "--tokenizer", tokenizers[0].path, "--output-prefix", tmp_path / "b",
                        "--add-bos")
    assert bpe_proc.returncode == 2 and "has no BOS token" in bpe_proc.stderr
    assert files_in(tmp_path) == ["sp.bin", "sp.idx", "sp.json"]


BAD = {
    "invalid JSON": ('{"text": "cut', "invalid JSON: Unterminated string starting at (column 10)"),
    "missing key": ('{"body": "x"}', "no key 'text' (keys: 'body'); see --json-key"),
    "not a string": ('{"text": {"a": 1}}', "'text' is an object, expected a string"),
}


@pytest.mark.parametrize("kind, workers", [("invalid JSON", 0), ("missing key", 2), ("not a string", 1)])
def test_bad_input_stops_with_file_line_and_leaves_nothing(tmp_path, tokenizers, kind, workers):
    line, problem = BAD[kind]
    src = tmp_path / "in" / "bad.jsonl"
    src.parent.mkdir()
    # The bad line is the 30th, in the fourth batch of 8: earlier batches were already written when it fails.
    src.write_text('{"text": "fine text"}\n' * 29 + line + "\n" + '{"text": "after"}\n' * 5)
    out = tmp_path / "out"
    out.mkdir()
    # out/new/deeper does not exist: the run creates it, and must remove it again when it fails.
    proc = run_tool("--input", src, "--tokenizer", tokenizers[0].path, "--output-prefix", out / "new" / "deeper" / "x",
                    "--workers", workers, "--batch-size", 8)
    assert proc.returncode == 2
    assert f"{src}:30: {problem}" in proc.stderr.splitlines()  # a line of its own, after the progress bar
    assert "Traceback" not in proc.stderr
    assert files_in(out) == []  # no partial prefix, no temp files, no directory left behind


def test_invalid_utf8_stops_the_run(tmp_path, tokenizers):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"line one\nline \xc3\x28 two\n")
    proc = run_tool("--input", src, "--text-mode", "line", "--tokenizer", tokenizers[0].path,
                    "--output-prefix", tmp_path / "x")
    assert proc.returncode == 2
    assert f"{src}:2: invalid UTF-8: byte 0xc3 at column 6" in proc.stderr.splitlines()
    assert files_in(tmp_path) == ["bad.txt"]


def test_skip_bad_lines_counts_and_reports(tmp_path, tokenizers):
    bpe, _ = tokenizers
    src = tmp_path / "mixed.jsonl"
    lines = ['{"text": "good %d"}' % i for i in range(10)]
    for at, kind in ((2, "invalid JSON"), (5, "missing key"), (7, "not a string"), (8, "invalid JSON")):
        lines[at] = BAD[kind][0]
    lines.insert(4, '{"text": ""}')
    src.write_text("\n".join(lines) + "\n")
    proc = run_tool("--input", src, "--tokenizer", bpe.path, "--output-prefix", tmp_path / "x", "--skip-bad-lines",
                    "--max-bad-lines-shown", 2, "--workers", 2, "--batch-size", 3)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 bad records (--skip-bad-lines); the first 2:" in proc.stderr
    assert f"  {src}:3: {BAD['invalid JSON'][1]}" in proc.stderr
    assert f"  {src}:7: {BAD['missing key'][1]}" in proc.stderr
    assert f"{src}:9:" not in proc.stderr  # only the first two are listed
    assert "skipped 1 empty and 4 bad" in proc.stdout
    ds = IndexedDataset(tmp_path / "x")
    assert [bpe.decode(ds[i].tolist()[:-1]) for i in range(len(ds))] == [f"good {i}" for i in (0, 1, 3, 4, 6, 9)]
    assert ds.metadata["stats"] == {"documents": 6, "tokens": ds.num_tokens, "skipped_empty": 1, "skipped_bad": 4}


def test_text_and_parquet_inputs(tmp_path, tokenizers):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bpe, _ = tokenizers
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("para one\nline two\n\n\npara two\n")
    pq.write_table(pa.table({"content": ["row zero", "row one"]}), tmp_path / "in" / "b.parquet")
    proc = run_tool("--input", tmp_path / "in", "--text-mode", "paragraph", "--text-column", "content",
                    "--tokenizer", bpe.path, "--output-prefix", tmp_path / "x", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(tmp_path / "x")
    assert [bpe.decode(ds[i].tolist()[:-1]) for i in range(len(ds))] == \
        ["para one\nline two", "para two", "row zero", "row one"]
    assert [Path(s["path"]).name for s in ds.metadata["sources"]] == ["a.txt", "b.parquet"]


def test_unusable_arguments_exit_2_without_traceback(tmp_path, corpus, tokenizers):
    tok = tokenizers[0].path
    cases = [
        (["--input", tmp_path / "missing.jsonl", "--tokenizer", tok, "--output-prefix", tmp_path / "x"],
         f"{tmp_path / 'missing.jsonl'}: no such file or directory"),
        (["--input", corpus, "--tokenizer", tmp_path / "no_tok", "--output-prefix", tmp_path / "x"],
         f"{tmp_path / 'no_tok'}: no such tokenizer file or directory"),
        # A missing output directory is created (test_round_trip_and_sidecar), but not below a regular file.
        (["--input", corpus, "--tokenizer", tok, "--output-prefix", tmp_path / "afile" / "x"],
         f"{tmp_path / 'afile' / 'x'}: the output directory {tmp_path / 'afile'} is not a directory"),
        (["--input", corpus, "--tokenizer", tok, "--output-prefix", tmp_path / "afile" / "sub" / "x"],
         f"{tmp_path / 'afile' / 'sub' / 'x'}: cannot create the output directory {tmp_path / 'afile' / 'sub'}: "
         f"{tmp_path / 'afile'} is not a directory"),
        (["--input", tmp_path / "in.json", "--tokenizer", tok, "--output-prefix", tmp_path / "in"],
         f"preprocess_data.py: error: --output-prefix {tmp_path / 'in'}: the output would overwrite the input "
         f"--input {tmp_path / 'in.json'}"),
    ]
    (tmp_path / "in.json").write_text('{"text": "JSONL named .json"}\n')
    (tmp_path / "afile").write_text("a regular file where a directory is expected\n")
    for args, message in cases:
        proc = run_tool(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr.splitlines()
        assert "Traceback" not in proc.stderr
    assert files_in(tmp_path) == ["afile", "in.json"]
    proc = run_tool("--input", corpus, "--tokenizer", tok, "--output-prefix", tmp_path / "x", "--workers", -1)
    assert proc.returncode == 2 and "--workers must be >= 0" in proc.stderr


def test_library_call_matches_the_tool(tmp_path, corpus, tokenizers):
    """preprocess() in-process (workers=0, other batches) writes the same bytes as the tool; returns its counts."""
    bpe, _ = tokenizers
    proc = run_tool("--input", corpus, "--tokenizer", bpe.path, "--output-prefix", tmp_path / "tool",
                    "--batch-size", 5, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = preprocess([corpus], tmp_path / "lib", bpe.path, options=ReaderOptions(batch_size=3), workers=0,
                         progress=False)
    for ext in ("bin", "idx", "json"):
        assert (tmp_path / f"lib.{ext}").read_bytes() == (tmp_path / f"tool.{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "lib")
    assert (summary["documents"], summary["tokens"], summary["skipped_empty"], summary["skipped_bad"]) == \
        (len(TEXTS), ds.num_tokens, 2, 0)
    assert summary["input_bytes"] == corpus.stat().st_size
    assert summary["output_bytes"] == sum((tmp_path / f"lib.{ext}").stat().st_size for ext in ("bin", "idx", "json"))
    with pytest.raises(ValueError, match="workers must be >= 0"):
        preprocess([corpus], tmp_path / "neg", bpe.path, workers=-1)
