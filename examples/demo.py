"""The embedded demo (`make demo`): a real model learns real text on the CPU in a few minutes.

Every step runs the same command-line tool a user would run, and prints the command first:
  1. a corpus from the Python standard library's own documentation (on every machine with Python),
  2. a byte-level BPE tokenizer trained on it (nothing can be downloaded),
  3. the corpus tokenised into .bin/.idx prefixes (train and held-out),
  4. a small Llama-3-style decoder with QK-norm trained with `python -m megasynth.train`,
  5. held-out perplexity before and after, and a few sampled continuations.

    python examples/demo.py [--out demo_out] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megasynth.io import read_jsonl
from megasynth.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Return a new list containing",
    "The socket module provides",
    "If the file does not exist,",
]


def run(cmd: list[str], env: dict | None = None) -> None:
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    started = time.time()
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(f"demo: step failed with exit code {result.returncode}: {shown}")
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for everything the demo writes (default demo_out)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the demo config's)")
    parser.add_argument("--quick", action="store_true",
                        help="20 steps of 4 sequences: checks the pipeline end to end in well under a minute (used by the tests)")
    args = parser.parse_args()

    out = (REPO / args.out).resolve()
    corpus, tokenizer, data, run_dir = out / "corpus", out / "tokenizer", out / "data", out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.time()

    print("== 1. corpus: the Python standard library's documentation")
    run([py, "-m", "megasynth.data.stdlib_corpus", "--out", corpus], env)

    print("\n== 2. tokenizer: byte-level BPE, 4096 ids, trained on the training split")
    run([py, "tools/train_tokenizer.py", "--input", corpus / "train.jsonl", "--output", tokenizer,
         "--type", "bpe", "--vocab-size", "4096", "--chat-tokens", "--overwrite"], env)  # chat tokens: examples/sft fine-tunes this

    print("\n== 3. preprocessing into .bin/.idx prefixes")
    for split in ("train", "valid"):
        run([py, "tools/preprocess_data.py", "--input", corpus / f"{split}.jsonl", "--output-prefix", data / split,
             "--tokenizer", tokenizer, "--workers", "2", "--overwrite"], env)  # a rerun rebuilds the data
    sidecar = json.loads((data / "train.json").read_text())

    print("\n== 4. training (CPU, float32)")
    train_cmd = [py, "-m", "megasynth.train", "--config", "examples/configs/demo.toml",
                 f"--data.data_path={data / 'train'}", f'--data.valid_paths=["{data / "valid"}"]',
                 f"--model.vocab_size={sidecar['vocab_size']}", f"--train.run_dir={run_dir}", "--train.resume=none"]
    if args.quick:
        train_cmd += ["--train.steps=20", "--train.eval_every=10", "--train.log_every=5",
                      "--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.eval_batches=2"]
    elif args.steps:
        train_cmd += [f"--train.steps={args.steps}"]
    run(train_cmd, env)

    evals = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("kind") == "eval"]
    first, last = evals[0], evals[-1]

    print("\n== 5. sampling from the trained model")
    samples = out / "samples.jsonl"
    gen_cmd = [py, "tools/generate.py", "--checkpoint", run_dir, "--output", samples,
               "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "40", "--seed", "0", "--prompt", *PROMPTS]
    run(gen_cmd, env)
    for _, row in read_jsonl(samples):
        print(f"\n  > {row['prompt']}\u2026\n    {row['text'].strip()[:300]!r}")

    print("\n== done in {:.0f} s".format(time.time() - started))
    print(f"  held-out perplexity: {first['ppl']:.1f} at step {first['step']}  ->  {last['ppl']:.1f} at step {last['step']}"
          f"  (loss {first['loss']:.3f} -> {last['loss']:.3f})")
    print(f"  corpus       {corpus}/{{train,valid}}.jsonl")
    print(f"  tokenizer    {tokenizer}")
    print(f"  datasets     {data}/{{train,valid}}.{{bin,idx,json}}")
    print(f"  run          {run_dir}  (config.toml, metrics.jsonl, checkpoints/)")
    print(f"  samples      {samples}")
    if not last["loss"] < first["loss"]:
        sys.exit("demo: the held-out loss did not fall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
