"""tools/make_pair_dataset.py as a user runs it: a good run prints its counts, and bad input (indices outside the
corpus, a tokenizer without <|sep|>, an empty table, an existing output) exits 2 with one line and writes nothing."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import load_tool
from sbp_helpers import make_corpus, make_tokenizer

from megasynth.data.indexed import IndexedDataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_pair_dataset")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(d / "real", make_tokenizer(d / "tok"))


def pairs_file(path, seeds, targets):
    pq.write_table(pa.table({"seed": pa.array(seeds, pa.int64()), "target": pa.array(targets, pa.int64())}), path)
    return path


def test_a_run_writes_the_masked_prefix_and_refuses_to_overwrite(tool, corpus, tmp_path, capsys):
    pairs = pairs_file(tmp_path / "pairs.parquet", [0, 1, 2], [1, 2, 3])
    out = tmp_path / "out" / "pairs"
    args = ["--pairs", str(pairs), "--corpus", corpus, "--output-prefix", str(out), "--no-progress"]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_pair_dataset.py"), *args, "--both-directions",
                           "--max-target-tokens", "5"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6 sequences from 3 pairs" in proc.stdout
    ds = IndexedDataset(out)
    assert len(ds) == 6 and ds.has_loss_mask
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err


@pytest.mark.parametrize("case, message", [
    ("out_of_range", "pairs.parquet: row 1: seed 99 is not a document of"),
    ("empty", "the pair table has no rows; pass --allow-empty"),
    ("no_separator", "tools/train_tokenizer.py --chat-tokens"),
    ("zero_limit", "max_seed_tokens must be >= 1"),
    ("missing_corpus", "real_missing.idx: no such file"),
])
def test_bad_input_exits_2_with_one_line(tool, corpus, tmp_path, capsys, case, message):
    rows = {"out_of_range": ([0, 99], [1, 2]), "empty": ([], [])}.get(case, ([0], [1]))
    pairs = pairs_file(tmp_path / "pairs.parquet", *rows)
    use = corpus
    extra = []
    if case == "no_separator":
        use = make_corpus(tmp_path / "plain", make_tokenizer(tmp_path / "plain_tok", separator=False))
    elif case == "zero_limit":
        extra = ["--max-seed-tokens", "0"]
    elif case == "missing_corpus":
        use = corpus + "_missing"
    out = tmp_path / "out"
    rc = tool.main(["--pairs", str(pairs), "--corpus", use, "--output-prefix", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.glob("out*"))
