"""Supervised fine-tuning (SFT) end to end on the CPU: questions about the Python standard library, answered.

Every step runs the command-line tool a user would run, and prints the command first:
  1. an instruction set built offline from the standard library's source ("What does json.dumps(obj, ...)
     do?" -> the first paragraph of its docstring), in two formats: Alpaca and chat JSONL,
  2. a base model: `make demo`'s checkpoint (or one trained here when there is none),
  3. tools/preprocess_sft.py: the records rendered with the chat template into masked prefixes (the loss
     mask marks the answers; train and held-out),
  4. `python -m megasynth.train` from the `make demo` checkpoint (--train.init_from, its own LR schedule) on
     the examples packed whole into windows (`packing = "pack"`), evaluating the masked held-out loss,
  5. a few held-out questions answered with the chat template (tools/generate.py --chat).

    python examples/sft/run.py [--base demo_out] [--out sft_out] [--quick | --tiny]

The base model is `make demo`'s (BASE/run, with its tokenizer); when BASE holds none, the example first trains
one with examples/demo.py (its --quick variant under --quick) or, under --tiny, a very small one of its own.
--tiny is the test suite's variant: every step of the pipeline in well under a minute (each tool forked from this
process, which imported torch once), not a useful model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

from demo import preload, run

from megasynth import checkpoint
from megasynth.config import DataSource, load_config, save_config
from megasynth.io import atomic_write_text
from megasynth.metrics import read_metrics

HERE = Path(__file__).resolve().parent
# Per mode: instruction examples kept (0 = all), SFT steps, sequences per step, the base (if trained here).
MODES = {
    "full": {"limit": 0, "steps": 300, "batch": 16, "micro": 8, "base_args": []},
    "quick": {"limit": 0, "steps": 60, "batch": 16, "micro": 8, "base_args": ["--quick"]},
    "tiny": {"limit": 240, "steps": 4, "batch": 4, "micro": 4, "base_args": None},
}
# --tiny imports these once and forks every Python step from this process (examples/demo.py preload()): the tools'
# own command lines, without importing torch again in each of them.
TINY_PRELOAD = ("megasynth.train", "megasynth.generate", "megasynth.data.sft", "megasynth.data.preprocess")
FILES = ("train_alpaca", "train_chat", "valid_alpaca", "valid_chat")
TINY_MODEL = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
              "--model.ffn_dim=128", "--model.max_seq_len=128", "--data.seq_len=128"]


def find_base(base: Path) -> Path | None:
    """BASE/run's newest checkpoint, if its tokenizer carries a chat template (make demo's does)."""
    try:
        ckpt = checkpoint.resolve_checkpoint(base / "run")
    except checkpoint.CheckpointError:
        return None
    config = base / "run" / "tokenizer" / "tokenizer_config.json"
    try:
        has_template = "chat_template" in json.loads(config.read_text())
    except (OSError, ValueError):
        has_template = False
    if not has_template:
        print(f"  {base / 'run'}: its tokenizer has no chat template (an older `make demo`?); not using it")
        return None
    return ckpt


def train_tiny_base(out: Path, instructions: Path, env: dict) -> None:
    """A few steps of a small model on the training answers as plain text (the demo's pieces, scaled down)."""
    py, corpus, data = sys.executable, out / "corpus.jsonl", out / "data"
    out.mkdir(parents=True, exist_ok=True)
    answers = [json.loads(line) for f in ("train_alpaca", "train_chat")
               for line in (instructions / f"{f}.jsonl").read_text().splitlines()]
    atomic_write_text(corpus, "".join(json.dumps({"text": r.get("output") or r["messages"][-1]["content"]}) + "\n"
                                      for r in answers))
    run([py, "tools/train_tokenizer.py", "--input", corpus, "--output", out / "tokenizer",
         "--type", "bpe", "--vocab-size", "512", *_chat_token_flag(), "--overwrite", "--no-progress"], env)
    run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", data / "train",
         "--tokenizer", out / "tokenizer", "--overwrite"], env)
    vocab = json.loads((data / "train.json").read_text())["vocab_size"]
    run([py, "-m", "megasynth.train", "--config", "examples/configs/demo.toml", f"--data.data_path={data / 'train'}",
         f"--model.vocab_size={vocab}", f"--train.run_dir={out / 'run'}", "--train.resume=none", "--train.steps=3",
         "--train.eval_every=0", "--train.global_batch_size=4", "--train.micro_batch_size=4", *TINY_MODEL], env)


def held_out_loss(evals: list[dict], step: int) -> float:
    losses = [r["loss"] for r in evals if r["step"] == step]
    return sum(losses) / len(losses)


def _chat_token_flag() -> list[str]:
    # tools/train_tokenizer.py --chat-tokens adds the built-in chat template's special tokens (issue 11).
    text = (REPO / "tools" / "train_tokenizer.py").read_text()
    return ["--chat-tokens"] if "--chat-tokens" in text else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="demo_out",
                        help="a `make demo` output directory (default demo_out): BASE/run is fine-tuned; when it "
                             "holds no checkpoint, a base model is trained into OUT/base first")
    parser.add_argument("--out", default="sft_out", help="directory for everything the example writes (default sft_out)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="60 fine-tuning steps: a few minutes on 2 cores")
    mode.add_argument("--tiny", action="store_true",
                      help="a few steps on 240 examples with a tiny base model: the test suite's end-to-end check")
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps (default: the mode's)")
    args = parser.parse_args()
    m = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    steps = args.steps or m["steps"]

    out = (REPO / args.out).resolve()
    instructions, data, run_dir = out / "instructions", out / "data", out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the example always fine-tunes afresh
    if args.tiny:
        preload(*TINY_PRELOAD)
    py, env, started = sys.executable, dict(os.environ, PYTHONUNBUFFERED="1"), time.time()

    print("== 1. instruction set: standard-library functions and their docstrings, two formats")
    limit = ["--limit", str(m["limit"])] if m["limit"] else []
    run([py, HERE / "instructions.py", "--out", instructions, *limit], env)

    print("\n== 2. the base model")
    base = find_base((REPO / args.base).resolve()) if not args.tiny else None
    if base is None:
        base_dir = out / "base"
        if find_base(base_dir) is None:
            if m["base_args"] is None:
                train_tiny_base(base_dir, instructions, env)
            else:
                run([py, "examples/demo.py", "--out", base_dir, *m["base_args"]], env)
        base = find_base(base_dir)
    base_run = base.parent.parent
    tokenizer = base_run / "tokenizer"
    print(f"  fine-tuning {base} (tokenizer {tokenizer})")

    print("\n== 3. preprocessing with the chat template into masked prefixes (one per file; --format auto)")
    for name in FILES:
        run([py, "tools/preprocess_sft.py", "--input", instructions / f"{name}.jsonl", "--tokenizer", tokenizer,
             "--output-prefix", data / name, "--format", "auto", "--overwrite", "--no-progress"], env)

    print("\n== 4. fine-tuning from the base checkpoint (examples packed whole, loss on the answers only)")
    cfg = load_config(base_run / "config.toml")
    cfg.data.data_path = ""
    # Both formats, each weighted by its size, packed whole; the held-out loss is the masked loss of each.
    sizes = {f: json.loads((data / f"{f}.json").read_text())["num_documents"] for f in FILES}
    cfg.data.sources = [DataSource(path=str(data / f), weight=float(sizes[f]), name=f, packing="pack")
                        for f in FILES if f.startswith("train")]
    cfg.data.valid_paths = [str(data / f) for f in FILES if f.startswith("valid")]
    cfg.data.cache_dir = ""
    t = cfg.train
    t.run_dir, t.resume, t.init_from, t.steps = str(run_dir), "none", str(base), steps
    t.global_batch_size, t.micro_batch_size = m["batch"], m["micro"]
    t.eval_every, t.eval_batches, t.log_every, t.checkpoint_every = steps, 4, max(1, steps // 10), 0
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e-3, max(1, steps // 10), "cosine"
    save_config(cfg, out / "sft.toml")
    run([py, "-m", "megasynth.train", "--config", out / "sft.toml"], env)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    before, after = held_out_loss(evals, 0), held_out_loss(evals, steps)

    print("\n== 5. held-out questions answered with the chat template")
    held_out = [json.loads(line) for line in (instructions / "valid_chat.jsonl").read_text().splitlines()][:3]
    samples = out / "answers.jsonl"
    run([py, "tools/generate.py", "--checkpoint", run_dir, "--chat", "--output", samples, "--max-new-tokens",
         "48" if not args.tiny else "8", "--temperature", "0", "--prompt",
         *[r["messages"][0]["content"] for r in held_out]], env)
    for row, record in zip((json.loads(line) for line in samples.read_text().splitlines()), held_out):
        print(f"\n  Q: {record['messages'][0]['content']}\n  A: {row['text'].strip()[:300]!r}"
              f"\n  (docstring: {record['messages'][1]['content'][:200]!r})")

    print(f"\n== done in {time.time() - started:.0f} s")
    print(f"  held-out masked loss (answer tokens only, mean of the two formats): {before:.3f} at step 0 (the "
          f"base model)  ->  {after:.3f} at step {steps}")
    print(f"  instructions  {instructions}/{{train,valid}}_{{alpaca,chat}}.jsonl")
    print(f"  datasets      {data}/{{train,valid}}_{{alpaca,chat}}.{{bin,idx,mask,json}}")
    print(f"  run           {run_dir}  (config.toml, metrics.jsonl, checkpoints/)")
    print(f"  answers       {samples}")
    if not after < before:
        sys.exit("sft example: the held-out masked loss did not fall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
