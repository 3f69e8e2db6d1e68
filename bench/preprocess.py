"""Benchmark tools/preprocess_data.py against the tokenizer's own batched encode, and check its memory stays flat.

    python bench/preprocess.py                          # ~300 MB of generated JSONL, a BPE trained here
    python bench/preprocess.py --size-mb 60 --small-mb 20 --workers 1 2 4
    python bench/preprocess.py --input corpus.jsonl --tokenizer tok/ --small-mb 0

The generated corpus is real text: paragraphs of the Python standard library's docstrings and help topics
(megasynth.data.stdlib_corpus), recombined by a seeded generator into documents of 1 to 8 paragraphs until the
file reaches the size asked for. Unless --tokenizer is given, a byte-level BPE of 8192 ids is trained on the
first few MB.

Measured: (1) raw `tokenizer.encode_batch` in this process, one thread, batches of --batch-size, on the first
--raw-mb of the same documents (JSON parsing excluded, after a warm-up of four batches); (2) the tool end to end (a subprocess, so process
start, reading, parsing, IPC and writing are all in) at each --workers, docs/s and tokens/s over wall time and
the peak RSS of its whole process tree (the sum over the tool and its workers, polled from /proc every 50
ms); (3) the same at --small-mb, to show the peak RSS does not grow with the input. The overhead ratio is
(tool tokens/s / workers) / raw tokens/s: 1.0 means a worker tokenizes as fast as the bare library call.
On a machine with fewer free cores than workers + 1 that wall-clock ratio measures contention, not overhead,
so the table also gives CPU time per token (the tool's whole process tree, from wait4, against the raw loop's):
the work the tool adds (parsing, IPC, writing, process start), whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megasynth.io import atomic_open

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "preprocess_data.py"


def build_corpus(path: Path, size_mb: float, seed: int = 0) -> None:
    """Write JSONL documents of real text until the file holds size_mb megabytes (atomic)."""
    from megasynth.data.stdlib_corpus import iter_stdlib_documents

    paragraphs = [p.strip() for _, text in iter_stdlib_documents() for p in text.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    written = 0
    with atomic_open(path, "w") as f:
        while written < target:
            doc = "\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 8)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line.encode())


def head_file(src: Path, dst: Path, size_mb: float) -> None:
    """The first whole lines of src up to size_mb megabytes."""
    limit = int(size_mb * 1e6)
    with open(src, "rb") as f, open(dst, "wb") as out:
        n = 0
        for line in f:
            if n + len(line) > limit:
                break
            out.write(line)
            n += len(line)


def raw_throughput(tokenizer_path: str, corpus: Path, raw_mb: float, batch_size: int) -> dict:
    """docs/s and tokens/s of tokenizer.encode_batch alone, single-threaded, on the first raw_mb of corpus."""
    from megasynth.tokenizer import limit_tokenizer_threads, load_tokenizer

    limit_tokenizer_threads(1)
    tok = load_tokenizer(tokenizer_path)
    texts, n = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            n += len(line)
            if n >= raw_mb * 1e6:
                break
    # Warm up first: a BPE keeps a cache of recent words, which the tool's long runs have warm almost throughout.
    tok.encode_batch(texts[: 4 * batch_size])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch_size):
        tokens += sum(map(len, tok.encode_batch(texts[i : i + batch_size], append_eod=True)))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    return {"docs_s": len(texts) / seconds, "tokens_s": tokens / seconds, "seconds": seconds, "docs": len(texts),
            "cpu_us_per_token": 1e6 * cpu / tokens}


def _tree_rss_kib(root: int) -> int:
    """Resident memory of root and all its descendants, in KiB (0 once root is gone)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                pages = int(f.read().split()[1])
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE") // 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_tool(corpus: Path, tokenizer: str, prefix: Path, workers: int, batch_size: int) -> dict:
    cmd = [sys.executable, str(TOOL), "--input", str(corpus), "--tokenizer", tokenizer, "--output-prefix",
           str(prefix), "--workers", str(workers), "--batch-size", str(batch_size), "--no-progress", "--overwrite"]
    started = time.perf_counter()
    # --no-progress keeps both pipes nearly empty, so nothing blocks while they are read only at the end.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while True:
        # wait4, not poll(): it returns the CPU time of the tool and of the workers it reaped.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_rss_kib(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the tool failed ({proc.returncode}):\n{err}")
    meta = json.loads(Path(f"{prefix}.json").read_text())
    docs, tokens = meta["num_documents"], meta["num_tokens"]
    cpu = usage.ru_utime + usage.ru_stime
    return {"workers": workers, "docs_s": docs / seconds, "tokens_s": tokens / seconds, "seconds": seconds,
            "peak_rss_mib": peak / 1024, "docs": docs, "tokens": tokens, "summary": out.strip(),
            "cpu_us_per_token": 1e6 * cpu / tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="a JSONL file to use instead of the generated corpus")
    p.add_argument("--size-mb", type=float, default=300, help="size of the generated corpus (default 300)")
    p.add_argument("--small-mb", type=float, default=100,
                   help="the smaller input for the memory comparison, the first lines of the corpus; 0 skips it "
                        "(default 100)")
    p.add_argument("--raw-mb", type=float, default=30,
                   help="megabytes of the corpus the raw encode_batch baseline tokenizes (default 30)")
    p.add_argument("--tokenizer", help="tokenizer to use (default: train a byte-level BPE of 8192 ids here)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)")
    p.add_argument("--batch-size", type=int, default=1024, help="records per batch, for both (default 1024)")
    p.add_argument("--workdir", help="where corpus, tokenizer and outputs go (default: a temp dir, removed after)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.input:
            corpus = Path(args.input)
        else:
            corpus = work / f"corpus-{args.size_mb:g}MB.jsonl"
            if not corpus.exists():
                t = time.perf_counter()
                build_corpus(corpus, args.size_mb)
                print(f"generated {corpus} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
        tokenizer = args.tokenizer
        if tokenizer is None:
            from megasynth.tokenizer import train_bpe_tokenizer

            sample = work / "tokenizer-sample.jsonl"
            head_file(corpus, sample, 5)
            texts = (json.loads(line)["text"] for line in open(sample, encoding="utf-8"))
            tokenizer = str(train_bpe_tokenizer(texts, work / "tokenizer", vocab_size=8192).path)
        raw = raw_throughput(tokenizer, corpus, args.raw_mb, args.batch_size)
        print(f"raw encode_batch: {raw['docs']:,} docs in {raw['seconds']:.1f} s")

        runs = []
        for workers in args.workers:
            r = run_tool(corpus, tokenizer, work / f"out-w{workers}", workers, args.batch_size)
            r["input_mb"] = corpus.stat().st_size / 1e6
            print(f"workers {workers}: {r['summary']}")
            runs.append(r)
        if args.small_mb:
            small = work / f"small-{args.small_mb:g}MB.jsonl"
            head_file(corpus, small, args.small_mb)
            for workers in sorted({min(args.workers), max(args.workers)}):
                r = run_tool(small, tokenizer, work / f"small-w{workers}", workers, args.batch_size)
                r["input_mb"] = small.stat().st_size / 1e6
                print(f"workers {workers}, small input: {r['summary']}")
                runs.append(r)

    print(f"\ncores: {os.cpu_count()}, batch size {args.batch_size}, tokenizer {tokenizer}\n")
    print("| run | input MB | wall s | docs/s | tokens/s | tokens/s per worker / raw | CPU µs/token | "
          "CPU / raw CPU | peak RSS (tree) MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| raw encode_batch, 1 thread | {args.raw_mb:g} | {raw['seconds']:.1f} | {raw['docs_s']:,.0f} | "
          f"{raw['tokens_s']:,.0f} | 1.00 | {raw['cpu_us_per_token']:.2f} | 1.00 | |")
    for r in runs:
        ratio = r["tokens_s"] / r["workers"] / raw["tokens_s"]
        cpu_ratio = r["cpu_us_per_token"] / raw["cpu_us_per_token"]
        print(f"| tool --workers {r['workers']} | {r['input_mb']:.0f} | {r['seconds']:.1f} | {r['docs_s']:,.0f} | "
              f"{r['tokens_s']:,.0f} | {ratio:.2f} | {r['cpu_us_per_token']:.2f} | {cpu_ratio:.2f} | "
              f"{r['peak_rss_mib']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
