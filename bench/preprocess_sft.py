"""Benchmark preprocess_sft against the raw tokenizer on the same records (issue 11: overhead under 15%).

    python bench/preprocess_sft.py                    # 20,000 chat records of real text, a BPE trained here
    python bench/preprocess_sft.py --records 50000 --tokenizer tok/

Records are two-turn chats built from the Python standard library's docstring paragraphs (user: one paragraph,
assistant: the next). Measured in this process with one tokenizer thread, as CPU time (best of --repeats):
  raw       tokenizer.encode_batch_array on each record's rendered text (the text the output decodes to), into
            the dataset's token dtype, batches of --batch-size; rendering and JSON parsing not included
  sft       megasynth.data.sft.preprocess_sft with --workers 0, end to end: reading and parsing the JSONL,
            validation, rendering the built-in template, tokenizing each record as one text (the same call as
            raw), finding the targets in the ids, writing .bin/.idx/.mask/.json
  sft-jinja the same with a jinja chat_template in the tokenizer: renders prefixes of each conversation,
            tokenizes the pieces apart and checks the tokens around their boundaries
The ratio is tokens/s against raw; overhead = 1 - ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from megasynth.chat import BUILTIN_TEMPLATE, TRAINING_SPECIAL_TOKENS, load_chat_template
from megasynth.data.indexed import smallest_token_dtype
from megasynth.data.sft import preprocess_sft
from megasynth.data.stdlib_corpus import iter_stdlib_documents
from megasynth.io import atomic_write_json
from megasynth.tokenizer import (
    HF_CONFIG,
    limit_tokenizer_threads,
    load_tokenizer,
    train_bpe_tokenizer,
)

# The built-in template with the jinja whitespace control a Hub template has: same output, but not the same
# text, so it takes the general path.
JINJA_TEMPLATE = BUILTIN_TEMPLATE.replace("{% for message in messages %}", "{%- for message in messages %}")


def build_records(path: Path, n: int, seed: int = 0) -> list[list[dict]]:
    paragraphs = [p.strip() for _, text in iter_stdlib_documents() for p in text.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        q, a = rng.sample(paragraphs, 2)
        chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats), encoding="utf-8")
    return chats


def best(fns: dict, repeats: int) -> dict:
    """Least CPU time of this process per function over the repeats, the functions taking turns in each repeat
    (a shared machine's load then weighs on all of them alike): everything runs in this process on one thread,
    and CPU time, unlike wall time, does not count what other processes take from it."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {name: min(ts) for name, ts in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="chat records to build (default 20000)")
    parser.add_argument("--tokenizer", help="a tokenizer with the chat tokens (default: train a BPE of 8192 ids)")
    parser.add_argument("--batch-size", type=int, default=512, help="records per batch (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best taken (default 3)")
    args = parser.parse_args()
    limit_tokenizer_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chats = build_records(tmp / "chat.jsonl", args.records)
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
        if not args.tokenizer:
            train_bpe_tokenizer((m["content"] for c in chats[:4000] for m in c), tok_dir, vocab_size=8192,
                                special_tokens=list(TRAINING_SPECIAL_TOKENS))
        tok = load_tokenizer(tok_dir)
        template = load_chat_template(tok)
        texts = [template.render(c) for c in chats]
        n_tokens = sum(int(tok.encode_batch_array(texts[i:i + args.batch_size])[1].sum())
                       for i in range(0, len(texts), args.batch_size))

        def run_sft(tokenizer_dir, name):
            return preprocess_sft([tmp / "chat.jsonl"], tmp / "out" / name, tokenizer_dir, workers=0,
                                  batch_size=args.batch_size, progress=False, overwrite=True)

        summary = run_sft(tok_dir, "builtin")
        jinja_dir = tmp / "tok_jinja"
        tok.save(jinja_dir)
        config = json.loads((jinja_dir / HF_CONFIG).read_text())
        atomic_write_json(jinja_dir / HF_CONFIG, {**config, "chat_template": JINJA_TEMPLATE})
        dtype = smallest_token_dtype(tok.vocab_size)  # what preprocess_sft writes
        times = best({"raw": lambda: [tok.encode_batch_array(texts[i:i + args.batch_size], dtype=dtype)
                                       for i in range(0, len(texts), args.batch_size)],
                      "sft": lambda: run_sft(tok_dir, "builtin"), "jinja": lambda: run_sft(jinja_dir, "jinja")},
                     args.repeats)
        raw, sft, jinja = times["raw"], times["sft"], times["jinja"]
    # The output holds one EOD per record beyond the rendered text.
    assert summary["tokens"] == n_tokens + len(chats), (summary["tokens"], n_tokens)
    print(f"{len(chats):,} two-turn chat records, {n_tokens:,} tokens of rendered text, "
          f"{summary['target_tokens']:,} target tokens, tokenizer vocab {tok.vocab_size:,}, 1 thread")
    print("| run | CPU s | tokens per CPU s | ratio to raw |\n|---|---:|---:|---:|")
    for name, sec in (("raw encode_batch_array", raw), ("preprocess_sft, built-in template", sft),
                      ("preprocess_sft, jinja template", jinja)):
        print(f"| {name} | {sec:.2f} | {n_tokens / sec:,.0f} | {raw / sec:.3f} |")
    print(f"overhead (built-in template): {1 - raw / sft:.1%} (target < 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
