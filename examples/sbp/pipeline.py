"""Synthetic bootstrapped pretraining (SBP, Yang et al. 2025) end to end on the CPU: the driver of run.sh.

Every stage runs the command-line tool a user would run, and prints the command first:
   0. a corpus from the Python standard library's documentation, split so that the "oracle" set holds more
      unique documents than the "real" set (real is a subset of oracle), plus a held-out set,
   1. a byte-level BPE tokenizer with the chat tokens (<|sep|> joins seed and target),
   2. the real / oracle / held-out prefixes,
   3. a small base model pretrained on the real set,
   4. tools/embed_corpus.py: every real document -> a unit vector (offline MiniLM),
   5. tools/build_pairs.py: nearest-neighbour pairs in a similarity band, near-copies dropped,
   6. tools/make_pair_dataset.py: "seed <|sep|> target EOD" with the loss on the target,
   7. python -m megasynth.train from the base checkpoint with examples/sbp/synthesizer.toml,
   8. tools/synthesize.py: new documents from random real seeds at temperature 1,
   9. tools/synth_quality.py: repetition, duplicates, pair-copying, pair-irrelevance (no judge offline),
  10. tools/plan_mixture.py --compute-matched: baseline (real repeated), SBP (real + synthetic), oracle (more
      unique real data) at equal tokens and FLOPs; the three runs trained,
  11. tools/compare_runs.py, then OUT/report.md: the quality table, the held-out losses, the plot.

    bash examples/sbp/run.sh [--out runs/sbp] [--quick | --tiny]

--quick is the one-command check (estimated 8-10 minutes on 2 idle CPU cores); --tiny is the test suite's
variant (every stage on a few dozen documents with a toy model: seconds of compute, not a result; each tool
forked from this process, which imported torch once); with neither, a larger run (the demo's model, an hour or
more on a CPU). examples/sbp/gpu.md gives the recipe at GPU scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

from demo import preload, run  # noqa: E402 - the demo's "print the command, run it, stop on failure"

from megasynth.config import DataSource, config_to_dict, load_config, save_config  # noqa: E402
from megasynth.io import atomic_write_text, read_jsonl  # noqa: E402

from sbp_report import LABELS, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = {
    # real / oracle / held-out documents (0 = all), tokenizer, model and the steps of each training.
    "full": dict(real_docs=600, oracle_docs=0, heldout_docs=0, max_chars=0, vocab=4096,
                 model=dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, max_seq_len=256),
                 seq_len=256, batch=16, base_steps=600, synth_steps=200, horizon_steps=600, eval_every=100,
                 eval_batches=8, embed_tokens=256, k=8, min_sim=0.5, max_sim=0.95, pairs_per_seed=4,
                 pair_tokens=127, num_docs=2048, new_tokens=128, quality_sample=2048),
    "quick": dict(real_docs=150, oracle_docs=0, heldout_docs=0, max_chars=0, vocab=2048,
                  model=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=128),
                  seq_len=128, batch=8, base_steps=150, synth_steps=60, horizon_steps=150, eval_every=50,
                  eval_batches=4, embed_tokens=128, k=8, min_sim=0.5, max_sim=0.95, pairs_per_seed=4,
                  pair_tokens=63, num_docs=384, new_tokens=64, quality_sample=384),
    "tiny": dict(real_docs=40, oracle_docs=120, heldout_docs=12, max_chars=1200, vocab=512,
                 model=dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64),
                 seq_len=64, batch=4, base_steps=4, synth_steps=3, horizon_steps=4, eval_every=2,
                 eval_batches=1, embed_tokens=32, k=4, min_sim=0.3, max_sim=0.99, pairs_per_seed=2,
                 pair_tokens=31, num_docs=16, new_tokens=24, quality_sample=16),
}
RUNS = ("baseline", "synthetic", "oracle")
# --tiny imports these once and forks every Python stage from this process (examples/demo.py preload()): the
# tools' own command lines, without importing torch and sentence-transformers again in each of them.
TINY_PRELOAD = ("megasynth.train", "megasynth.synth.sbp.embed", "sentence_transformers", "faiss", "pyarrow.parquet")


def split_corpus(corpus: Path, m: dict) -> dict:
    """real.jsonl and oracle.jsonl (real a subset of oracle; from the training split) and heldout.jsonl (from
    the held-out split).

    Documents are ordered by a hash of their origin (a fixed, machine-independent shuffle); oracle takes the
    first oracle_docs of them and real the first real_docs, so real is a subset of oracle."""
    def ordered(split: str) -> list[dict]:
        rows = [obj for _, obj in read_jsonl(corpus / f"{split}.jsonl")]
        if m["max_chars"]:
            rows = [r for r in rows if len(r["text"]) <= m["max_chars"]]
        return sorted(rows, key=lambda r: hashlib.sha256(r["origin"].encode()).hexdigest())

    train, valid = ordered("train"), ordered("valid")
    parts = {"oracle": train[: m["oracle_docs"] or None], "real": train[: m["real_docs"]],
             "heldout": valid[: m["heldout_docs"] or None]}
    for name, rows in parts.items():
        atomic_write_text(corpus / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in parts.items()}


def base_config(out: Path, m: dict, data: Path, vocab: int) -> Path:
    """examples/configs/demo.toml at the mode's size, trained on the real set, evaluated on the held-out set."""
    cfg = load_config(REPO / "examples" / "configs" / "demo.toml")
    for key, value in {**m["model"], "vocab_size": vocab}.items():
        setattr(cfg.model, key, value)
    cfg.data.seq_len, cfg.data.data_path, cfg.data.sources = m["seq_len"], "", [DataSource(path=str(data / "real"))]
    cfg.data.valid_paths, cfg.data.cache_dir = [str(data / "heldout")], ""
    cfg.data.max_repetition = 32.0  # the baseline repeats the real set many times on purpose (20x in the paper)
    t = cfg.train
    t.steps, t.global_batch_size, t.micro_batch_size = m["base_steps"], m["batch"], m["batch"]
    t.run_dir, t.resume, t.eval_every, t.eval_batches = str(out / "base"), "none", m["eval_every"], m["eval_batches"]
    t.log_every, t.checkpoint_every = max(1, m["base_steps"] // 10), 0
    cfg.optim.warmup_steps = max(1, m["base_steps"] // 10)
    path = out / "configs" / "base.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return path


def same_training(a: Path, b: Path) -> bool:
    """True when two configs train the same steps on the same data: equal in every key but where the run is
    written and how it resumes, and in their sources but for their display names."""
    def normalised(path: Path) -> dict:
        d = config_to_dict(load_config(path))
        d["train"].pop("run_dir"), d["train"].pop("resume")
        for source in d["data"]["sources"]:
            source.pop("name")
        return d
    return normalised(a) == normalised(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sbp", help="directory for everything the pipeline writes "
                        "(default runs/sbp); its report.md is the result")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the one-command check: about 10 minutes on 2 CPU cores")
    mode.add_argument("--tiny", action="store_true", help="every stage on a few dozen documents with a toy model "
                      "(the test suite's end-to-end check; not a result)")
    args = parser.parse_args()
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    m = MODES[mode_name]
    out = (REPO / args.out).resolve()
    corpus, tok, data = out / "corpus", out / "tokenizer", out / "data"
    for stale in ("base", "synthesizer", "plans", "quality", "compare", *RUNS):  # every run starts afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    if args.tiny:
        preload(*TINY_PRELOAD)
    py, env = sys.executable, dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    timings: dict[str, float] = {}
    started = time.time()

    def stage(name: str) -> None:
        timings[name] = time.time()
        print(f"\n== {name}", flush=True)

    stage("0. corpus: the standard library's documentation, split into real (a subset of oracle), oracle and held-out")
    run([py, "-m", "megasynth.data.stdlib_corpus", "--out", corpus], env)
    counts = split_corpus(corpus, m)
    print(f"  real {counts['real']} documents, oracle {counts['oracle']} (real is a subset), held-out "
          f"{counts['heldout']} -> {corpus}/{{real,oracle,heldout}}.jsonl")

    stage("1. tokenizer: byte-level BPE with the chat tokens (<|sep|>)")
    run([py, "tools/train_tokenizer.py", "--input", corpus / "oracle.jsonl", "--output", tok, "--type", "bpe",
         "--vocab-size", str(m["vocab"]), "--chat-tokens", "--overwrite", "--no-progress"], env)

    stage("2. preprocessing: real, oracle and held-out prefixes")
    for name in ("real", "oracle", "heldout"):
        run([py, "tools/preprocess_data.py", "--input", corpus / f"{name}.jsonl", "--output-prefix", data / name,
             "--tokenizer", tok, "--overwrite"], env)
    vocab = json.loads((data / "real.json").read_text())["vocab_size"]

    stage("3. pretraining the base model on the real set")
    base_cfg = base_config(out, m, data, vocab)
    run([py, "-m", "megasynth.train", "--config", base_cfg], env)

    stage("4. embedding every real document (SBP stage 1)")
    emb = out / "emb"
    run([py, "tools/embed_corpus.py", "--input", data / "real", "--output", emb, "--max-tokens",
         str(m["embed_tokens"]), "--overwrite", "--no-progress"], env)

    stage("5. nearest-neighbour pairs (SBP stage 2)")
    pairs = out / "pairs"
    run([py, "tools/build_pairs.py", "--embeddings", emb, "--output", pairs, "--k", str(m["k"]), "--min-sim",
         str(m["min_sim"]), "--max-sim", str(m["max_sim"]), "--max-pairs-per-seed", str(m["pairs_per_seed"]),
         "--overwrite", "--no-progress"], env)

    stage("6. the pair dataset: seed <|sep|> target, loss on the target (SBP stage 3)")
    run([py, "tools/make_pair_dataset.py", "--pairs", pairs.with_suffix(".parquet"), "--corpus", data / "real",
         "--output-prefix", data / "pairs", "--max-seed-tokens", str(m["pair_tokens"]), "--max-target-tokens",
         str(m["pair_tokens"]), "--overwrite", "--no-progress"], env)

    stage("7. tuning the synthesizer from the base checkpoint (SBP stage 4)")
    steps = m["synth_steps"]
    run([py, "-m", "megasynth.train", "--config", HERE / "synthesizer.toml", f"--train.init_from={out / 'base'}",
         f"--model.vocab_size={vocab}", *(f"--model.{k}={v}" for k, v in m["model"].items()),
         f"--data.seq_len={m['seq_len']}", f'--data.sources=[{{path = "{data / "pairs"}", packing = "pack"}}]',
         f"--train.run_dir={out / 'synthesizer'}", "--train.resume=none", f"--train.steps={steps}",
         f"--train.global_batch_size={m['batch']}", f"--train.micro_batch_size={m['batch']}",
         f"--optim.warmup_steps={max(1, steps // 10)}", f"--train.log_every={max(1, steps // 10)}",
         "--train.checkpoint_every=0"], env)

    stage("8. synthesis: new documents from random real seeds at temperature 1 (SBP stage 5)")
    run([py, "tools/synthesize.py", "--checkpoint", out / "synthesizer", "--corpus", data / "real",
         "--output-prefix", data / "synthetic", "--num-docs", str(m["num_docs"]), "--max-seed-tokens",
         str(m["pair_tokens"]), "--max-new-tokens", str(m["new_tokens"]), "--seed", "0", "--overwrite",
         "--no-progress"], env)

    stage("9. quality of the synthetic documents (SBP stage 6)")
    run([py, "tools/synth_quality.py", "--synthetic", data / "synthetic", "--corpus", data / "real", "--pairs",
         pairs.with_suffix(".parquet"), "--out", out / "quality", "--sample", str(m["quality_sample"]),
         "--embed-max-tokens", str(m["embed_tokens"])], env)

    stage("10. compute-matched runs: baseline, SBP (real + synthetic), oracle")
    horizon = m["horizon_steps"] * m["batch"] * m["seq_len"]
    run([py, "tools/plan_mixture.py", "--compute-matched", "--config", base_cfg, "--tokens", str(horizon),
         "--real", data / "real", "--synthetic", data / "synthetic", "--oracle", data / "oracle",
         "--out", out / "plans", "--runs-root", out, "--synthesizer-config", base_cfg], env)
    for name in RUNS:
        if name == "baseline" and same_training(base_cfg, out / "plans" / "baseline.toml"):
            # The base model of stage 3 is the baseline run (real data, same model, steps and seed): training it
            # again would repeat the same steps to the same bytes, so its run directory is reused.
            shutil.copytree(out / "base", out / "baseline")
            print(f"  baseline: the same training as the base model of stage 3; reusing {out / 'base'}")
            continue
        run([py, "-m", "megasynth.train", "--config", out / "plans" / f"{name}.toml"], env)

    stage("11. comparison and report")
    run([py, "tools/compare_runs.py", *(out / name for name in RUNS), "--out", out / "compare",
         *(arg for name in RUNS for arg in ("--label", LABELS[name]))], env)
    timings["end"] = time.time()
    report = write_report(out, mode_name, counts, m, timings, started)
    print(f"\n== done in {time.time() - started:.0f} s: {report}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
