"""EntiGraph synthetic continued pretraining (Yang et al., ICLR 2025), end to end, against any OpenAI-compatible LLM.

Every step runs the command-line tool a user would run, and prints the command first:
  1. documents + closed-book questions: QuALITY's JSONL (--input) through tools/import_quality.py, or, without
     --input, a small niche corpus built here (standard-library modules in QuALITY's format, whose function
     descriptions the base model never trained on; examples/entigraph/niche_corpus.py),
  2. the base model: `make demo`'s checkpoint (BASE/run), or one trained here when there is none,
  3. tools/entigraph.py: a summary and the entities of each document, then relation texts for sampled entity
     pairs and triples, straight into a prefix (summaries included) in the base model's tokenizer (resumable: a
     rerun asks nothing twice),
  4. tools/rephrase.py: the rephrase baseline (plain / encyclopedic / question-answer) through the same client,
     up to the token count of the EntiGraph corpus (--target-tokens-of),
  5. continued pretraining from the base checkpoint, once per synthetic corpus, each blended 0.9 / 0.1 with
     replay of the base model's pretraining data ([[data.sources]]), the same steps and batch (the same
     number of training tokens),
  6. tools/eval.py closed-book QuALITY-style accuracy of the base model and of both continued runs; a table.

    python examples/entigraph/run.py --base-url http://localhost:8000/v1 --model Qwen/Qwen3-8B   # vLLM
    python examples/entigraph/run.py --input QuALITY.v1.0.1.htmlstripped.dev --base-url https://api.openai.com/v1 \\
        --model gpt-4o-mini --price-in 0.15 --price-out 0.60 --budget-usd 20
    python examples/entigraph/run.py --quick          # no endpoint: the offline stand-in (below), a few minutes

Without --base-url the generator is examples/entigraph/offline_llm.py, started here on 127.0.0.1: an
OpenAI-compatible server that answers the prompts by extracting sentences from the document. It is no language
model; it runs the pipeline (HTTP client, retries, work dir, ledger, preprocessing, training, evaluation) where
no endpoint is reachable. (A local model goes through vLLM's OpenAI-compatible server, as --base-url; one as
small as the demo's cannot follow the entity-extraction prompt, so nothing would come out.)
--tiny is the test suite's variant: every step in well under a minute (each tool forked from this process, which
imported torch once), numbers without meaning.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

from demo import preload, run  # noqa: E402

from megasynth import checkpoint  # noqa: E402
from megasynth.config import DataSource, load_config, save_config  # noqa: E402
from megasynth.data.indexed import IndexedDataset  # noqa: E402
from megasynth.data.prefix import sidecar_path  # noqa: E402
from megasynth.data.stdlib_corpus import iter_stdlib_documents  # noqa: E402
from megasynth.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
# Per mode: niche modules (0 = all), pairs / triples per document, most rephrase samples per (document, style),
# continued-pretraining steps and batch.
MODES = {
    "full": {"modules": 0, "pairs": 24, "triples": 12, "samples": 32, "steps": 200, "batch": 16, "micro": 8,
             "base_args": []},
    "quick": {"modules": 6, "pairs": 16, "triples": 8, "samples": 16, "steps": 30, "batch": 8, "micro": 8,
              "base_args": ["--quick"]},
    "tiny": {"modules": 2, "pairs": 3, "triples": 1, "samples": 4, "steps": 3, "batch": 4, "micro": 4,
             "base_args": None},
}
TINY_MODEL = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
              "--model.ffn_dim=128", "--model.max_seq_len=128", "--data.seq_len=128"]
# --tiny imports these once and forks every Python step from this process (examples/demo.py preload()): the tools'
# own command lines, without importing torch again in each training and evaluation.
TINY_PRELOAD = ("megasynth.train", "megasynth.eval.harness", "megasynth.generate", "megasynth.synth.entigraph",
                "megasynth.synth.rephrase", "megasynth.data.preprocess")
SYNTH_WEIGHT = 0.9  # the rest is replay of the base model's pretraining data, against forgetting
# LLM flags passed through to tools/entigraph.py and tools/rephrase.py when given (see megasynth.synth.llm).
LLM_FLAGS = ("api_key_env", "concurrency", "rpm", "tpm", "max_attempts", "transient_budget_s", "timeout",
             "max_tokens", "price_in", "price_out", "budget_tokens", "budget_usd")


def find_base(base: Path) -> Path | None:
    try:
        return checkpoint.resolve_checkpoint(base / "run")
    except checkpoint.CheckpointError:
        return None


def train_tiny_base(out: Path, env: dict) -> None:
    """A few steps of a very small model on 150 standard-library docstrings (the demo's pieces, scaled down)."""
    py, corpus, data = sys.executable, out / "corpus.jsonl", out / "data"
    out.mkdir(parents=True, exist_ok=True)
    docs = itertools.islice(iter_stdlib_documents(), 150)
    atomic_write_text(corpus, "".join(json.dumps({"text": text}) + "\n" for _, text in docs))
    run([py, "tools/train_tokenizer.py", "--input", corpus, "--output", out / "tokenizer", "--type", "bpe",
         "--vocab-size", "512", "--overwrite", "--no-progress"], env)
    run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", data / "train",
         "--tokenizer", out / "tokenizer", "--overwrite", "--no-progress"], env)
    vocab = json.loads((data / "train.json").read_text())["vocab_size"]
    run([py, "-m", "megasynth.train", "--config", "examples/configs/demo.toml", f"--data.data_path={data / 'train'}",
         f"--model.vocab_size={vocab}", f"--train.run_dir={out / 'run'}", "--train.resume=none", "--train.steps=3",
         "--train.eval_every=0", "--train.global_batch_size=4", "--train.micro_batch_size=4", *TINY_MODEL], env)


def replay_sources(cfg) -> list[tuple[str, float]]:
    """The base run's training sources as (prefix, weight), from [[data.sources]] or Megatron's data_path."""
    if cfg.data.sources:
        return [(s.path, s.weight) for s in cfg.data.sources]
    parts = cfg.data.data_path.split()
    if len(parts) == 1:
        return [(parts[0], 1.0)]
    return [(path, float(weight)) for weight, path in zip(parts[0::2], parts[1::2])]


def start_offline_llm(out: Path) -> tuple[subprocess.Popen, str]:
    """Start examples/entigraph/offline_llm.py on a free port; returns the process and its base URL."""
    log = open(out / "offline_llm.log", "w")
    proc = subprocess.Popen([sys.executable, str(HERE / "offline_llm.py")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        sys.exit(f"entigraph example: the offline stand-in did not start (see {out / 'offline_llm.log'})")
    return proc, url


def generate(cmd: list, env: dict) -> None:
    """Run a generator tool; its exit codes 3 (stopped by the budget) and 4 (items failed, nothing published),
    records kept either way, end the example cleanly."""
    try:
        run(cmd, env)
    except SystemExit as e:
        if "exit code 3:" in str(e.code):
            sys.exit("entigraph example: stopped by the budget (see above); every finished request is kept in the "
                     "work dir: rerun the same command with a larger --budget-usd / --budget-tokens to continue")
        if "exit code 4:" in str(e.code):
            sys.exit("entigraph example: some requests failed (listed above); every finished request is kept in the "
                     "work dir: rerun the same command to ask again for transient failures, or add --allow-partial "
                     "to go on without the failed items")
        raise


def llm_args(args, base_url: str, model: str) -> list[str]:
    flags = ["--base-url", base_url, "--model", model]
    for name in LLM_FLAGS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags + (["--allow-partial"] if args.allow_partial else [])


def continued_pretraining(base_run: Path, base: Path, synthetic: Path, out: Path, m: dict, steps: int,
                          env: dict) -> Path:
    """Train from `base` on synthetic (0.9) + replay (0.1); returns the run directory."""
    cfg = load_config(base_run / "config.toml")
    replay = replay_sources(cfg)
    total = sum(w for _, w in replay)
    cfg.data.data_path, cfg.data.valid_paths, cfg.data.cache_dir = "", [], ""
    cfg.data.sources = [DataSource(path=str(synthetic), weight=SYNTH_WEIGHT, name=synthetic.name)] + [
        DataSource(path=p, weight=(1 - SYNTH_WEIGHT) * w / total, name=f"replay_{Path(p).name}") for p, w in replay]
    t = cfg.train
    t.run_dir, t.resume, t.init_from, t.steps = str(out), "none", str(base), steps
    t.global_batch_size, t.micro_batch_size = m["batch"], m["micro"]
    t.eval_every, t.log_every, t.checkpoint_every = 0, max(1, steps // 10), 0
    # A continued-pretraining schedule: short warmup, a peak below pretraining's, cosine to 10%.
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e-3, max(1, steps // 10), "cosine"
    shutil.rmtree(out, ignore_errors=True)
    save_config(cfg, out.parent / f"{out.name}.toml")
    run([sys.executable, "-m", "megasynth.train", "--config", out.parent / f"{out.name}.toml"], env)
    return out


def evaluate(checkpoint_dir: Path, tokenizer: Path, tasks: list[Path], out: Path, env: dict) -> dict:
    run([sys.executable, "tools/eval.py", "--checkpoint", checkpoint_dir, "--tokenizer", tokenizer,
         "--tasks", *tasks, "--out", out, "--overwrite"], env)  # a rerun of the example evaluates afresh
    return json.loads((out / "results.json").read_text())["tasks"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help="QuALITY JSONL files (e.g. QuALITY.v1.0.1.htmlstripped.dev); default: the built-in "
                             "niche corpus of standard-library modules")
    parser.add_argument("--base", default="demo_out",
                        help="a `make demo` output directory (default demo_out): BASE/run is the base model; when it "
                             "holds no checkpoint, one is trained into OUT/base first")
    parser.add_argument("--out", default="entigraph_out",
                        help="directory for everything the example writes (default entigraph_out); the EntiGraph "
                             "and rephrase work dirs in it make a rerun resume instead of asking again")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="6 niche documents, 16 pairs and 8 triples each, 30 training steps: minutes on a CPU")
    mode.add_argument("--tiny", action="store_true",
                      help="2 documents, a tiny base model, 3 training steps: the test suite's end-to-end check")
    parser.add_argument("--steps", type=int, default=0,
                        help="continued-pretraining steps per run (default: the mode's)")
    parser.add_argument("--max-pairs-per-doc", type=int, default=0,
                        help="entity pairs per document (default: the mode's)")
    parser.add_argument("--max-triples-per-doc", type=int, default=-1,
                        help="entity triples per document (default: the mode's)")
    parser.add_argument("--no-rephrase", action="store_true", help="skip the rephrase baseline")
    g = parser.add_argument_group("LLM endpoint (default: the offline stand-in, examples/entigraph/offline_llm.py)")
    g.add_argument("--base-url", help="OpenAI-compatible API root: http://localhost:8000/v1 (vLLM), "
                                      "https://api.openai.com/v1 (OpenAI)")
    g.add_argument("--model", help="model name as the endpoint knows it (required with --base-url)")
    g.add_argument("--api-key-env", help="environment variable holding the API key (tools' default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, help="most requests in flight")
    g.add_argument("--rpm", type=float, help="requests-per-minute limit")
    g.add_argument("--tpm", type=float, help="tokens-per-minute limit")
    g.add_argument("--max-attempts", type=int, help="most requests per item that got a reply (JSON repairs "
                   "included; transient failures such as 429 or 5xx do not count)")
    g.add_argument("--transient-budget-s", type=float, help="seconds an item keeps retrying transient failures "
                   "(429, 5xx, timeouts, dropped connections)")
    g.add_argument("--allow-partial", action="store_true", help="publish the synthetic corpora even when some items "
                   "failed (default: stop, records kept)")
    g.add_argument("--timeout", type=float, help="seconds per HTTP request")
    g.add_argument("--max-tokens", type=int, help="most completion tokens per request")
    g.add_argument("--price-in", type=float, help="US$ per million prompt tokens (cost estimates in the ledger)")
    g.add_argument("--price-out", type=float, help="US$ per million completion tokens")
    g.add_argument("--budget-tokens", type=int, help="stop each generation step cleanly at this many tokens")
    g.add_argument("--budget-usd", type=float, help="stop each generation step cleanly at this estimated cost")
    args = parser.parse_args()
    if args.base_url and not args.model:
        parser.error("--base-url needs --model")
    m = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    steps = args.steps or m["steps"]
    pairs = args.max_pairs_per_doc or m["pairs"]
    triples = m["triples"] if args.max_triples_per_doc < 0 else args.max_triples_per_doc

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    quality, data, runs, evals = out / "quality", out / "data", out / "runs", out / "eval"
    if args.tiny:
        preload(*TINY_PRELOAD)
    py, env, started = sys.executable, dict(os.environ, PYTHONUNBUFFERED="1"), time.time()

    print("== 1. documents and closed-book questions")
    inputs = [Path(p).resolve() for p in args.input or []]  # the tools run in the repository root
    if not inputs:
        inputs = [out / "niche_quality.jsonl"]
        run([py, HERE / "niche_corpus.py", "--out", inputs[0], "--modules", str(m["modules"])], env)
    run([py, "tools/import_quality.py", "--input", *inputs, "--out", quality, "--overwrite"], env)
    tasks = [quality / "quality.jsonl"] + ([quality / "quality_heldout.jsonl"]
                                           if (quality / "quality_heldout.jsonl").exists() else [])

    print("\n== 2. the base model")
    base = find_base((REPO / args.base).resolve()) if not args.tiny else None
    if base is None:
        base_dir = out / "base"
        if find_base(base_dir) is None:
            if m["base_args"] is None:
                train_tiny_base(base_dir, env)
            else:
                run([py, "examples/demo.py", "--out", base_dir, *m["base_args"]], env)
        base = find_base(base_dir)
    base_run = base.parent.parent
    tokenizer = base_run / "tokenizer"
    print(f"  continuing from {base} (tokenizer {tokenizer})")

    server = None
    base_url, model = args.base_url, args.model
    if not base_url:
        server, base_url = start_offline_llm(out)
        model = "offline-extractive"
        print(f"  no --base-url: the offline stand-in serves {base_url}")
    try:
        print("\n== 3. EntiGraph: entities, then relations of sampled pairs and triples")
        entigraph = data / "entigraph"
        generate([py, "tools/entigraph.py", "--input", quality / "documents.jsonl",
                  "--work-dir", out / "work_entigraph", "--output-prefix", entigraph, "--tokenizer", tokenizer,
                  "--max-pairs-per-doc", str(pairs), "--max-triples-per-doc", str(triples), "--include-summaries",
                  "--seed", "0", "--overwrite", "--no-progress", *llm_args(args, base_url, model)], env)
        rephrase = data / "rephrase"
        if not args.no_rephrase:
            print("\n== 4. the rephrase baseline: documents rewritten in three styles up to EntiGraph's token count")
            generate([py, "tools/rephrase.py", "--input", quality / "documents.jsonl",
                      "--work-dir", out / "work_rephrase", "--output-prefix", rephrase, "--tokenizer", tokenizer,
                      "--target-tokens-of", entigraph, "--samples-per-doc", str(m["samples"]), "--seed", "0",
                      "--overwrite", "--no-progress", *llm_args(args, base_url, model)], env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)

    corpora = {"entigraph": entigraph} | ({} if args.no_rephrase else {"rephrase": rephrase})
    print("\n== 5. continued pretraining: synthetic 0.9 + replay 0.1, the same steps for each corpus")
    cpt = {name: continued_pretraining(base_run, base, prefix, runs / name, m, steps, env)
           for name, prefix in corpora.items()}

    print("\n== 6. closed-book evaluation before and after")
    results = {"base": evaluate(base, tokenizer, tasks, evals / "base", env)}
    for name, run_dir in cpt.items():
        results[f"{name} CPT"] = evaluate(run_dir, tokenizer, tasks, evals / name, env)
    train_tokens = steps * m["batch"] * load_config(base_run / "config.toml").data.seq_len

    rows = []
    for label, tasks_result in results.items():
        name = label.removesuffix(" CPT")
        row = {"model": label, "synthetic_documents": 0, "synthetic_tokens": 0, "llm_requests": 0, "cost_usd": 0.0,
               "training_tokens": 0}
        if name in corpora:
            ds = IndexedDataset(corpora[name])
            sidecar = json.loads(sidecar_path(corpora[name]).read_text())
            llm = sidecar.get("synthetic", {}).get("llm", {})  # the generator's ledger summary
            row.update(synthetic_documents=len(ds), synthetic_tokens=ds.num_tokens, training_tokens=train_tokens,
                       llm_requests=llm.get("requests", 0), cost_usd=llm.get("cost_usd", 0.0))
        for task, result in tasks_result.items():
            row[f"{task}_acc"] = result["metrics"]["acc"]
            row[f"{task}_acc_norm"] = result["metrics"]["acc_norm"]
            row[f"{task}_n"] = result["n"]
        rows.append(row)
    atomic_write_text(out / "summary.json", json.dumps(rows, indent=2) + "\n")
    task_names = [t.name.removesuffix(".jsonl") for t in tasks]
    header = ["model", "synthetic docs", "synthetic tokens", "LLM requests", "est. cost", "training tokens"]
    header += [f"{t} acc (acc_norm)" for t in task_names]
    print(f"\n== done in {time.time() - started:.0f} s; closed-book accuracy "
          f"({rows[0][task_names[0] + '_n']} questions, 4 options: chance 0.25)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["model"], f"{r['synthetic_documents']:,}", f"{r['synthetic_tokens']:,}", f"{r['llm_requests']:,}",
                 f"${r['cost_usd']:.2f}", f"{r['training_tokens']:,}"]
        cells += [f"{r[t + '_acc']:.3f} ({r[t + '_acc_norm']:.3f})" for t in task_names]
        print("| " + " | ".join(cells) + " |")
    print(f"\n  questions   {quality}/quality.jsonl   documents {quality}/documents.jsonl")
    print(f"  synthetic   {data}/{{entigraph,rephrase}}.{{bin,idx,json}}  (work dirs {out}/work_*: records, ledger)")
    print(f"  runs        {runs}/{{entigraph,rephrase}}   eval {evals}/*/results.json   summary {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
