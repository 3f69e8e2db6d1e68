"""examples/sbp/run.sh --tiny: every SBP stage end to end through the real command-line tools, each output
checked for existence and sanity, and the report for the quality table and the three runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from megasynth.config import load_config
from megasynth.data.indexed import IndexedDataset
from megasynth.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STAGE_TOOLS = ("megasynth.data.stdlib_corpus", "tools/train_tokenizer.py", "tools/preprocess_data.py",
               "megasynth.train", "tools/embed_corpus.py", "tools/build_pairs.py", "tools/make_pair_dataset.py",
               "tools/synthesize.py", "tools/synth_quality.py", "tools/plan_mixture.py", "tools/compare_runs.py")


def test_sbp_pipeline_tiny_runs_every_stage(tmp_path):
    out = tmp_path / "sbp"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "sbp" / "run.sh"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    for tool in STAGE_TOOLS:  # every stage ran the real CLI and printed its command
        assert any(tool in line for line in printed), tool
    # The baseline trains exactly as the base model did (real data, same config): reused, not trained twice.
    assert "baseline: the same training as the base model of stage 3" in proc.stdout
    assert sum("megasynth.train" in line for line in printed) == 4  # base, synthesizer, SBP, oracle
    assert (out / "baseline" / "metrics.jsonl").read_bytes() == (out / "base" / "metrics.jsonl").read_bytes()

    # corpus split and prefixes: the oracle has more unique documents than the real set, which it contains
    data = out / "data"
    real, oracle, heldout = (IndexedDataset(data / n) for n in ("real", "oracle", "heldout"))
    assert len(oracle) > len(real) > 0 and len(heldout) > 0
    real_texts = {json.loads(line)["origin"] for line in (out / "corpus" / "real.jsonl").read_text().splitlines()}
    oracle_texts = {json.loads(line)["origin"] for line in (out / "corpus" / "oracle.jsonl").read_text().splitlines()}
    assert real_texts < oracle_texts
    assert len(load_tokenizer(out / "tokenizer").encode("<|sep|>")) == 1  # the chat tokens are there

    # embeddings: one unit row per real document
    emb = np.load(out / "emb.npy")
    assert emb.shape == (len(real), 384)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)

    # pairs: indices of real documents, no self-pairs, similarity in the band
    pairs = pq.read_table(out / "pairs.parquet").to_pydict()
    assert len(pairs["seed"]) > 0
    assert all(0 <= s < len(real) and 0 <= t < len(real) and s != t for s, t in zip(pairs["seed"], pairs["target"]))
    assert (out / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the masked pair dataset: one sequence per pair, loss on part of it only
    pair_ds = IndexedDataset(data / "pairs")
    assert pair_ds.has_loss_mask and len(pair_ds) == len(pairs["seed"])
    mask = pair_ds.loss_mask(0)
    assert 0 < mask.sum() < len(mask) and not mask[0]

    # the tuned synthesizer and its synthetic prefix with provenance
    assert list((out / "synthesizer" / "checkpoints").iterdir())
    synthetic = IndexedDataset(data / "synthetic")
    prov = pq.read_table(str(data / "synthetic") + ".provenance.parquet").to_pydict()
    assert len(synthetic) > 0 and sorted(prov["doc"]) == list(range(len(synthetic)))
    assert all(0 <= s < len(real) for s in prov["seed"])

    # quality: both rows, every metric a share in [0, 1] (non-factual n/a: no judge offline)
    results = json.loads((out / "quality" / "results.json").read_text())
    for row in ("synthetic", "reference"):
        r = results["rows"][row]
        for metric in ("repetition", "duplicate", "pair_irrelevance", "pair_copying"):
            assert 0.0 <= r[metric]["share"] <= 1.0 and r[metric]["n"] == r["documents"]
        assert r["non_factual"]["status"] == "n/a"

    # compute-matched plans: equal steps, batch and sequence length; the SBP run reads the synthetic prefix
    plans = {n: load_config(out / "plans" / f"{n}.toml") for n in ("baseline", "synthetic", "oracle")}
    shapes = {(c.train.steps, c.train.global_batch_size, c.data.seq_len) for c in plans.values()}
    assert len(shapes) == 1
    assert any(s.path.endswith("synthetic") for s in plans["synthetic"].data.sources)
    assert [s.path for s in plans["oracle"].data.sources] == [str(data / "oracle")]

    # the three runs, the comparison and the report
    tokens = set()
    for name in ("baseline", "synthetic", "oracle"):
        lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in lines if r.get("kind") == "eval"]
        assert evals and all(np.isfinite(r["loss"]) for r in evals)
        tokens.add(max(r["tokens"] for r in evals))
    assert len(tokens) == 1  # equal training tokens
    assert (out / "compare" / "heldout_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for text in ("| synthetic (this run) |", "| real neighbour pairs (reference) |", "| paper, 200B scale",
                 "baseline (real data repeated)", "SBP (real + synthetic)", "oracle (more unique real data)",
                 "compare/heldout_loss.png", "nobody should expect SBP to win"):
        assert text in report, text
