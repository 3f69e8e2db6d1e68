"""tools/synth_quality.py: the CLI over megasynth/synth/sbp/quality (the tests themselves are in tests/synth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from synth.quality_data import build_corpus, write_pairs, write_prefix, write_synthetic

from megasynth.synth.llm.settings import settings_from_args
from megasynth.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "synth_quality.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("cli_quality"))


def test_cli_writes_the_table_with_a_pairs_reference(corpus, tmp_path, capsys):
    n = len(corpus.docs)
    syn = write_synthetic(tmp_path / "syn", corpus, corpus.docs[::-1], list(range(n))[::-1])  # copies
    pairs = write_pairs(tmp_path / "pairs.parquet", seeds=list(range(10)), targets=list(range(10, 20)))
    rc = load_tool("synth_quality").main(["--synthetic", syn, "--corpus", corpus.prefix, "--out",
                                          str(tmp_path / "q"), "--pairs", pairs, "--embed-max-tokens", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| synthetic (this run) |" in out and "| paper, 200B scale" in out and "results.md" in out
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    assert res["rows"]["synthetic"]["pair_copying"]["share"] == 1.0
    assert res["rows"]["reference"]["documents"] == 10 and res["pairs"].endswith("pairs.parquet")
    assert res["rows"]["synthetic"]["non_factual"]["status"] == "n/a"
    assert "n/a" in (tmp_path / "q" / "results.md").read_text()


def test_cli_missing_provenance_exits_2_with_one_line(corpus, tmp_path):
    syn = write_prefix(tmp_path / "orphan", corpus.tokenizer, corpus.docs[:3])  # no .provenance.parquet
    proc = subprocess.run([sys.executable, str(TOOL), "--synthetic", syn, "--corpus", corpus.prefix, "--out",
                           str(tmp_path / "q")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {syn}.provenance.parquet: no such file"]
    assert not (tmp_path / "q" / "results.json").exists()


def test_cli_refuses_a_synthetic_prefix_of_another_tokenizer(corpus, tmp_path, capsys):
    other = train_bpe_tokenizer(corpus.texts, tmp_path / "tok2", vocab_size=400)
    docs = [np.array(other.encode(t, append_eod=True), dtype=np.int64) for t in corpus.texts[:4]]
    syn = write_prefix(tmp_path / "other", other, docs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc": pa.array(range(4), pa.int64()), "seed": pa.array(range(4), pa.int64())}),
                   syn + ".provenance.parquet")
    rc = load_tool("synth_quality").main(["--synthetic", syn, "--corpus", corpus.prefix, "--out", str(tmp_path / "q")])
    assert rc == 2
    assert "name different tokenizers" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--sample", "0"], "sample must be >= 1"),
    (["--judge-endpoint", "http://127.0.0.1:9/v1"], "--judge-model"),
    (["--copy-threshold", "1.5"], "argument --copy-threshold: expected a number in [0, 1], got '1.5'"),
])
def test_cli_bad_settings_exit_2(corpus, tmp_path, capsys, flags, message):
    syn = write_synthetic(tmp_path / "syn", corpus, corpus.docs[:3], [0, 1, 2])
    try:  # a flag out of its range is refused while parsing (argparse exits), the rest by the library
        rc = load_tool("synth_quality").main(["--synthetic", syn, "--corpus", corpus.prefix, "--out",
                                              str(tmp_path / "q"), *flags])
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_judge_flags_are_the_shared_endpoint_flags():
    """--judge-endpoint still names the judge's base URL, and the judge keeps its own defaults (8 requests in
    flight, temperature 0, replies of 512 tokens) unless a flag sets them."""
    tool = load_tool("synth_quality")
    base = ["--synthetic", "s", "--corpus", "c", "--out", "o", "--judge-model", "m"]

    def judge(*flags):
        return settings_from_args(tool.build_parser().parse_args([*base, *flags]), "judge-")

    old, new = judge("--judge-endpoint", "http://h/v1"), judge("--judge-base-url", "http://h/v1")
    assert old == new and (old.base_url, old.model) == ("http://h/v1", "m")
    assert (old.concurrency, old.temperature, old.max_tokens, old.api_key_env) == (8, 0.0, 512, "OPENAI_API_KEY")
    set_ = judge("--judge-base-url", "http://h/v1", "--judge-concurrency", "3", "--judge-transient-budget-s", "5",
                 "--judge-api-key-env", "K")
    assert (set_.concurrency, set_.transient_budget_s, set_.api_key_env) == (3, 5.0, "K")
