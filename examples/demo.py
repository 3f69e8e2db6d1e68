"""The embedded demo (`make demo`): a real model learns real text on the CPU in a few minutes.

Every step runs the same command-line tool a user would run, and prints the command first:
  1. a corpus from the Python standard library's own documentation (on every machine with Python),
  2. a byte-level BPE tokenizer trained on it (nothing can be downloaded),
  3. the corpus tokenised into .bin/.idx prefixes (train and held-out),
  4. a small Llama-3-style decoder with QK-norm trained with `python -m megasynth.train`,
  5. held-out perplexity before and after, and a few sampled continuations.

    python examples/demo.py [--out demo_out] [--steps N] [--quick | --tiny]

--quick trains 20 steps of 4 sequences (the pipeline end to end in well under a minute); --tiny is the test suite's
variant: --quick's steps with a smaller model, every tool forked from this process, which imported torch once.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from megasynth.io import read_jsonl
from megasynth.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
# --tiny: what the forked tools import once, and the smaller model (the demo's vocabulary, half its width and depth,
# 128-token windows: about a fifth of its parameters) that still learns visibly in 20 steps.
TINY_PRELOAD = ("megasynth.train", "megasynth.generate", "megasynth.data.preprocess")
TINY_MODEL = ["--model.dim=128", "--model.n_layers=2", "--model.ffn_dim=384", "--model.max_seq_len=128",
              "--data.seq_len=128"]
PROMPTS = [
    "Return a new list containing",
    "The socket module provides",
    "If the file does not exist,",
]


def run(cmd: list[str], env: dict | None = None) -> None:
    shown = " ".join(shlex.quote(str(c)) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    started = time.time()
    args = [str(c) for c in cmd]
    if _preloaded_path is not None and args[0] == sys.executable:
        returncode = _run_forked(args[1:], dict(os.environ) if env is None else env)
    else:
        returncode = subprocess.run(args, cwd=REPO, env=env).returncode
    if returncode != 0:
        sys.exit(f"demo: step failed with exit code {returncode}: {shown}")
    print(f"  ({time.time() - started:.0f} s)", flush=True)


# sys.path of a fresh interpreter minus its first entry, once preload() ran; None: run() starts new interpreters.
_preloaded_path: list[str] | None = None


def preload(*modules: str) -> None:
    """Import `modules` in this process once; from then on run() starts each `python TOOL ...` / `python -m MODULE
    ...` by forking this process instead of starting a new interpreter. The tool still runs as __main__ from its
    own file, with its argv, environment, working directory and exit code, so the command printed is the command
    tested; what is saved is importing torch (seconds of CPU) again in every stage. The test-suite variants
    (--tiny) use it, with torch on one thread: their toy models are so small that a second OpenMP thread costs
    more CPU than it saves (OMP_NUM_THREADS, when set, wins). POSIX only (elsewhere it does nothing); call it before
    anything here has started threads or run torch ops."""
    global _preloaded_path
    if not hasattr(os, "fork"):  # Windows: new interpreters, as without preload
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch imported from now on, here or in a new interpreter, reads it
    for name in modules:
        importlib.import_module(name)
    if "torch" in sys.modules:  # already initialised its threads: set them here, forked children inherit it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # The interpreter's own path, without the entries a driver script put in front (its folder, REPO, examples/).
    driver = getattr(sys.modules["__main__"], "__file__", None)
    ours = {str(REPO), str(REPO / "examples")} | ({str(Path(driver).resolve().parent)} if driver else set())
    _preloaded_path = [p for p in sys.path if p not in ours]


def _run_forked(args: list[str], env: dict) -> int:
    """`python ARGS` in a forked child of this (preloaded) process; returns its exit code."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:  # the child: never returns into the driver's frames, whatever happens
        os.chdir(REPO)
        os.environ.clear()
        os.environ.update(env)
        if env.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(line_buffering=True), sys.stderr.reconfigure(line_buffering=True)
        if args[0] == "-m":  # python -m MODULE: the working directory first on the path, MODULE run afresh
            sys.path[:] = [str(REPO), *_preloaded_path]
            sys.argv = [args[1], *args[2:]]
            sys.modules.pop(args[1], None)  # preloaded as a library module; a fresh `-m` run has no such copy
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:  # python SCRIPT: the script's folder first on the path
            script = (REPO / args[0]).resolve()
            sys.path[:] = [str(script.parent), *_preloaded_path]
            sys.argv = [str(script), *args[1:]]
            runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:  # what the interpreter does with sys.exit(code)
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught error: traceback and exit code 1, as the interpreter
        traceback.print_exc()
    finally:
        try:  # the interpreter's shutdown (as multiprocessing's forked children do it): wait for non-daemon threads,
            # run atexit handlers, flush what is open
            threading._shutdown()
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                if stream is not None and not stream.closed:  # a tool may close sys.stdout (json.tool does)
                    stream.flush()
        finally:
            os._exit(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for everything the demo writes (default demo_out)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the demo config's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="20 steps of 4 sequences: checks the pipeline end to end in well under a minute")
    mode.add_argument("--tiny", action="store_true",
                      help="the test suite's variant: --quick's 20 steps with a smaller model (dim 128, 2 layers, "
                           "128-token windows), every tool forked from this process; not a useful model")
    args = parser.parse_args()

    out = (REPO / args.out).resolve()
    corpus, tokenizer, data, run_dir = out / "corpus", out / "tokenizer", out / "data", out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    if args.tiny:
        preload(*TINY_PRELOAD)
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
    if args.quick or args.tiny:
        train_cmd += ["--train.steps=20", "--train.eval_every=10", "--train.log_every=5",
                      "--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.eval_batches=2"]
        train_cmd += TINY_MODEL if args.tiny else []
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
