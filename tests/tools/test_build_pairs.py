"""tools/build_pairs.py from the command line: a normal run, then every refusal with exit 2 and one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import load_tool
from synth.pair_inputs import clustered, unit, write_emb, write_prefix


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(rng.integers(20, 60))) for _ in range(120)]
    prefix = write_prefix(tmp_path / "corpus", docs)
    emb = write_emb(tmp_path / "emb", clustered(120, 16, 6, 0.7, seed=1), prefix)
    return tmp_path, prefix, emb, docs


def test_cli_writes_pairs(inputs, capsys):
    tmp_path, prefix, emb, _ = inputs
    out = tmp_path / "pairs"
    argv = ["--embeddings", emb, "--output", str(out), "--k", "4", "--min-sim", "0.3", "--max-sim", "0.99",
            "--max-pairs-per-seed", "2", "--index", "hnsw", "--no-progress"]
    assert load_tool("build_pairs").main(argv) == 0
    stdout = capsys.readouterr().out
    meta = json.loads((tmp_path / "pairs.json").read_text())
    table = pq.read_table(tmp_path / "pairs.parquet")
    assert table.schema.names == ["seed", "target", "similarity"] and table.num_rows == meta["counts"]["kept"] > 0
    assert f"{meta['counts']['kept']:,} pairs" in stdout and "hnsw index" in stdout
    assert meta["index"]["type"] == "hnsw" and meta["recall"]["k"] == 5 and meta["recall"]["recall"] >= 0.95
    assert meta["corpus"]["prefix"] == prefix  # taken from EMB.json when --corpus is not given
    assert np.bincount(table.column("seed").to_numpy()).max() <= 2
    assert (tmp_path / "pairs.png").stat().st_size > 1000
    assert load_tool("build_pairs").main([*argv, "--overwrite"]) == 0
    assert pq.read_table(tmp_path / "pairs.parquet").equals(table)


def test_cli_refusals(inputs, capsys):
    tmp_path, prefix, emb, docs = inputs
    main = load_tool("build_pairs").main

    def refused(*argv) -> str:
        assert main(["--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err
        return err

    out = ["--output", str(tmp_path / "p")]
    fewer = write_prefix(tmp_path / "fewer", docs[:-1])
    assert "120 embedding rows but" in refused("--embeddings", emb, *out, "--corpus", fewer)
    other = write_prefix(tmp_path / "other", [d[1:] for d in docs])
    assert "another corpus" in refused("--embeddings", emb, *out, "--corpus", other)
    vecs = clustered(120, 16, 6, 0.7, seed=1)
    vecs[7] = 0.5 * unit(vecs[7:8])[0]
    bad = write_emb(tmp_path / "bad", vecs, prefix)
    assert "row 7 has L2 norm 0.5" in refused("--embeddings", bad, *out)
    assert "--allow-empty" in refused("--embeddings", emb, *out, "--min-sim", "0.9999", "--max-sim", "1.0")
    assert "--min-sim < --max-sim" in refused("--embeddings", emb, *out, "--min-sim", "0.9", "--max-sim", "0.5")
    assert "no such file" in refused("--embeddings", str(tmp_path / "missing"), *out)
    assert "exceeds" in refused("--embeddings", emb, *out, "--index", "ivf", "--nlist", "500")
    assert not list(tmp_path.glob("p.*"))
    (tmp_path / "p.json").write_text("{}")
    assert "--overwrite" in refused("--embeddings", emb, *out)

