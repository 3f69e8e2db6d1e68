"""Sample continuations of text prompts from a checkpoint, batched with a KV cache; one JSONL line per prompt.

    python tools/generate.py --checkpoint runs/tiny --prompt "Once upon a time" --output out.jsonl
    python tools/generate.py --checkpoint runs/tiny --prompts-file prompts.jsonl --output out.jsonl --temperature 0.8
    torchrun --nproc_per_node=8 tools/generate.py --checkpoint runs/big --prompts-file p.jsonl --output out.jsonl

--prompts-file lines are {"id": ..., "prompt": "..."} ("id" optional: the line number by default). Output
lines, in input order: {"id", "prompt", "text", "num_tokens", "finish_reason"}: "text" is the continuation
without the end-of-document token, "num_tokens" counts the generated tokens (EOD included), finish_reason is
"eod" or "length". Under torchrun each rank takes prompts rank::world_size and rank 0 writes the one output
file. Every prompt has its own random stream, seeded by (--seed, its index), so the output does not depend on
the batch size or the number of ranks. Exit code 2 with FILE:LINE: message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from megasynth.chat import ChatTemplateError, ConversationError, load_chat_template
from megasynth.cli import ToolParser, check_outputs, file, float_range, nonnegative_float, run_dir
from megasynth.distributed import all_gather_object
from megasynth.generate import add_model_arguments, default_start_ids, generate, run_with_model
from megasynth.io import JsonlError, atomic_write_text, read_jsonl


class InputError(ValueError):
    pass


def read_prompts(args) -> list[tuple[str, str]]:
    """[(id, prompt text)] from --prompt or --prompts-file; errors name FILE:LINE."""
    if args.prompt:
        return [(str(i), p) for i, p in enumerate(args.prompt)]
    path = args.prompts_file
    prompts, seen = [], {}
    try:
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj.get("prompt"), str):
                raise InputError(f"{path}:{lineno}: field \"prompt\": expected a string")
            pid = obj.get("id", lineno)
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise InputError(f"{path}:{lineno}: field \"id\": expected a string or an integer, got {pid!r}")
            if str(pid) in seen:
                raise InputError(f"{path}:{lineno}: field \"id\": {pid!r} repeats line {seen[str(pid)]}")
            seen[str(pid)] = lineno
            prompts.append((str(pid), obj["prompt"]))
    except JsonlError as e:  # not JSON, not an object, not UTF-8, unreadable: already "FILE[:LINE]: ..."
        raise InputError(str(e)) from None
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT",
                        help="one or more prompts given on the command line (the flag may repeat)")
    source.add_argument("--prompts-file", metavar="FILE.jsonl", help='JSONL of {"id": ..., "prompt": "..."}')
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="where the continuations go")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0,
                        help="softmax temperature; 0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=1.0,
                        help="nucleus sampling mass, in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-prompt random streams (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--chat", action="store_true",
                        help="each prompt is a user message: format it with the tokenizer's chat template (the one "
                             "tools/preprocess_sft.py used; the built-in ChatML one when the tokenizer has none), "
                             "add no start token, and stop at the template's end-of-turn token")
    parser.add_argument("--no-start-token", action="store_true",
                        help="do not put BOS (or EOD when the tokenizer has no BOS) in front of each prompt")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only: static KV cache with each decoding step replayed as a CUDA graph")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": file(args.output)},
                  {"--prompts-file": args.prompts_file, "--checkpoint": run_dir(args.checkpoint),
                   "--tokenizer": args.tokenizer})
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    try:
        prompts = read_prompts(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_with_model(args, lambda *loaded: _run(args, prompts, *loaded))


def _run(args, prompts: list[tuple[str, str]], model, cfg, tok, _step_dir, info) -> int:
    try:
        template = load_chat_template(tok) if args.chat else None
        texts = {i: template.user_prompt(prompts[i][1]) if template else prompts[i][1]
                 for i in range(info.rank, len(prompts), info.world_size)}
    except (ChatTemplateError, ConversationError) as e:
        print(f"error: --chat: {e}", file=sys.stderr)
        return 2
    # A chat template writes its own opening tokens; its turns end with the end-of-turn token, not EOD.
    stop_id = template.end_of_turn_id if template and template.end_of_turn_id is not None else tok.eod_id
    start = [] if args.no_start_token or template else default_start_ids(tok)
    mine = list(range(info.rank, len(prompts), info.world_size))
    encoded = {i: start + tok.encode(texts[i]) for i in mine}
    where = args.prompts_file or "--prompt"
    errors = []
    for i in mine:
        n = len(encoded[i])
        if n == 0:
            errors.append(f"{where}: prompt {prompts[i][0]!r} is empty (and --no-start-token leaves nothing)")
        elif n + args.max_new_tokens > cfg.model.max_seq_len:
            errors.append(f"{where}: prompt {prompts[i][0]!r} has {n} tokens; with --max-new-tokens "
                          f"{args.max_new_tokens} that exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    # Every rank learns of every rank's errors, so all of them stop together (none hangs in a collective).
    errors = [e for part in all_gather_object(errors) for e in part]
    if errors:
        if info.is_main:
            print("\n".join(f"error: {e}" for e in errors[:20]), file=sys.stderr)
        return 2
    order = sorted(mine, key=lambda i: len(encoded[i]))  # similar lengths batch together: less padding
    results = {}
    bar = tqdm(total=len(mine), unit="prompt", disable=not info.is_main, desc=f"generate (rank 0 of {info.world_size})")
    t0, produced = time.perf_counter(), 0
    decode = "cuda_graph" if args.cuda_graph else "dynamic"
    for b in range(0, len(order), args.batch_size):
        batch = order[b : b + args.batch_size]
        outs = generate(model, [encoded[i] for i in batch], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eod_id=stop_id,
                        seed=args.seed, row_ids=batch, decode=decode)
        for i, out in zip(batch, outs):
            ended = bool(out) and out[-1] == stop_id
            text = tok.decode(out[:-1] if ended else out)
            results[i] = {"id": prompts[i][0], "prompt": prompts[i][1], "text": text, "num_tokens": len(out),
                          "finish_reason": "eod" if ended else "length"}
            produced += len(out)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{produced / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    gathered = all_gather_object(results)
    if info.is_main:
        merged = {i: r for part in gathered for i, r in part.items()}
        _write_jsonl_atomic(Path(args.output), [merged[i] for i in range(len(prompts))])
        total = sum(r["num_tokens"] for r in merged.values())
        print(f"wrote {len(merged)} continuations ({total} tokens) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
