"""Benchmark embed_corpus against sentence-transformers' own encode on the same documents (issue 12: >= 0.95x).

    python bench/embed.py                         # 256 stdlib docstrings, first 128 tokens, batch 32, offline MiniLM
    python bench/embed.py --docs 2000 --max-tokens 512 --batch-size 64 --device cuda --threads 0

Documents: the first --docs docstrings of the Python standard library, tokenized with a BPE trained here into a
prefix, as the pipeline has them. Both sides use one loaded model, the same --batch-size and the same texts:
  encode       SentenceTransformer.encode(texts, batch_size, normalize_embeddings=True) on the decoded texts
               (decoding not included; its own length sort over all documents)
  embed_corpus megasynth.synth.sbp.embed.embed_corpus end to end from the prefix: decoding the first --max-tokens
               tokens of each document, per-shard length sort and batching, float16 conversion, shard files,
               assembling EMB.npy and EMB.json
Each is run --repeats times, alternating; the best time counts. On a CPU shared with other jobs, process CPU
time (--clock cpu, the default there) is steadier than wall time; on a GPU use --clock wall. --threads sets torch's
intra-op threads (default 1: a steady CPU measurement; 0 leaves torch's default).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megasynth.data.preprocess import preprocess
from megasynth.data.stdlib_corpus import iter_stdlib_documents
from megasynth.io import remove_dir
from megasynth.synth.sbp.embed import EmbedOptions, PrefixTexts, default_model, embed_corpus, load_model, resolve_device
from megasynth.synth.sbp.embed_files import load_embeddings
from megasynth.tokenizer import train_bpe_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256, help="documents (default 256)")
    parser.add_argument("--max-tokens", type=int, default=128, help="corpus tokens per document (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both sides (default 32)")
    parser.add_argument("--shard-size", type=int, default=4096, help="embed_corpus shard size (default 4096)")
    parser.add_argument("--model", default="", help="model name or path (default: the offline MiniLM)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, best counts (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = torch's)")
    parser.add_argument("--clock", choices=("cpu", "wall", "auto"), default="auto",
                        help="cpu = process CPU time, wall = elapsed (default: cpu on CPU, wall on GPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clock_name = args.clock if args.clock != "auto" else ("wall" if device.startswith("cuda") else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = []
        for _, text in iter_stdlib_documents():
            texts.append(text)
            if len(texts) == args.docs:
                break
        (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        train_bpe_tokenizer(texts, tmp / "tok", vocab_size=2000)
        preprocess([str(tmp / "docs.jsonl")], tmp / "corpus", tmp / "tok", workers=0, progress=False)
        source = PrefixTexts(tmp / "corpus", max_tokens=args.max_tokens)
        decoded = source.texts(0, source.num_documents)
        name = args.model or default_model()
        model = load_model(name, device)
        options = EmbedOptions(model=name, batch_size=args.batch_size, shard_size=args.shard_size, device=device)

        def run_encode() -> np.ndarray:
            return model.encode(decoded, batch_size=args.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)

        def run_ours() -> None:
            embed_corpus(source, tmp / "emb", options, model=model, overwrite=True, progress=False)

        run_encode()  # warm-up: first calls allocate
        times = {"encode": [], "embed_corpus": []}
        for _ in range(args.repeats):
            for label, fn in (("encode", run_encode), ("embed_corpus", run_ours)):
                t0 = clock()
                fn()
                times[label].append(clock() - t0)
        ref = run_encode()
        emb, _ = load_embeddings(tmp / "emb")
        max_diff = float(np.abs(emb.astype(np.float32) - ref).max())
        if (tmp / "emb.embed-work").exists():
            remove_dir(tmp / "emb.embed-work")

    n = args.docs
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / v for k, v in best.items()}
    ratio = rate["embed_corpus"] / rate["encode"]
    print(f"{n} documents (first {args.max_tokens} tokens), batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} torch threads, {clock_name} time, best of {args.repeats}")
    print(f"{'':14s}{'docs/s':>10s}{'seconds':>10s}")
    for label in ("encode", "embed_corpus"):
        print(f"{label:14s}{rate[label]:10.1f}{best[label]:10.2f}")
    print(f"ratio embed_corpus / encode: {ratio:.3f} (target >= 0.95); max |difference| {max_diff:.2e} (float16)")
    if args.json:
        Path(args.json).write_text(json.dumps({"docs": n, "device": device, "clock": clock_name, "best_s": best,
                                               "docs_per_s": rate, "ratio": ratio, "max_abs_diff": max_diff}, indent=2))


if __name__ == "__main__":
    main()
