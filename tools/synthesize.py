"""SBP stage 5: synthetic documents from a tuned synthesizer, each prompted with a random document of a corpus.

    python tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real --output-prefix data/synth \\
        --num-docs 20000
    torchrun --nproc_per_node=8 tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real \\
        --output-prefix data/synth --tokens 200000000
    python tools/synthesize.py --checkpoint runs/synthesizer --corpus data/real --output-prefix data/synth \\
        --num-docs 100000 --endpoint http://localhost:8000/v1 --served-model synthesizer   # vLLM, for scale

Sample i is prompted with a corpus document drawn uniformly (seeded by --seed), cut to --max-seed-tokens, and
the pair separator (the layout of tools/make_pair_dataset.py): the one recorded in the sidecar of the pair data the
checkpoint was tuned on (its config's data sources), else --separator, else <|sep|>; the model samples up to
--max-new-tokens tokens at --temperature (1 by default: varied syntheses of one seed) and stops at EOD. Empty
outputs are dropped and counted. A document depends only on (--seed, its sample index): not on the batch size,
the number of torchrun ranks (each takes a share of the shards) or interruptions. Work goes in shards to --work-dir (default
OUT.work/) with a manifest of the settings; run the same command again after a crash or kill and it resumes,
publishing the same bytes as an uninterrupted run. --tokens T draws whole shards until the output holds at
least T tokens (EOD included). With --endpoint URL --served-model NAME (the shared LLM flags --base-url and
--model) the prompts go to an OpenAI-compatible completions server (vLLM serving the checkpoint exported with
tools/export_hf.py) as token ids, or with --endpoint-prompt text as text.
No sample is ever left out: transient failures (429 with its Retry-After, 408, 5xx, timeouts, dropped
connections) are retried for --transient-budget-s per sample without counting as attempts, and a sample that
still fails, or fails --max-attempts times for its content, stops the run with exit code 1 (the finished shards
stay; the same command resumes).

Output: OUT.bin/.idx/.json, a normal prefix of the documents in sample order, whose sidecar names the checkpoint
(and the sha256 of its meta.json), the corpus and its .idx sha256, the settings and the counts; and
OUT.provenance.parquet (doc, seed, sample). An existing output is refused unless --overwrite, an output or a
work directory that is, holds or sits inside one of the inputs (OUT = --corpus, say) always; a float flag that
is not a finite number in its range (--temperature nan) is refused while parsing. Bad input (a checkpoint whose
tokenizer lacks <|sep|> and no --separator, a --separator other than the recorded one, a corpus of another
tokenizer, --num-docs 0, ...) stops with one line and exit code 2. Library: megasynth.synth.sbp.synthesize.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megasynth.checkpoint import CheckpointError
from megasynth.cli import ToolParser, check_outputs, directory, float_range, nonnegative_float, prefix, run_dir
from megasynth.data.indexed import IndexedDatasetError, PrefixOutputError
from megasynth.distributed import destroy_distributed, init_distributed
from megasynth.run_lock import RunDirBusy
from megasynth.synth.llm import LLMSettings, add_llm_arguments, settings_from_args
from megasynth.synth.sbp.samplers import EndpointError
from megasynth.synth.sbp.shards import ShardError
from megasynth.synth.sbp.synthesize import SynthSettings, synthesize
from megasynth.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SynthSettings()
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_STEP_DIR",
                   help="the tuned synthesizer: a run directory (its newest checkpoint) or a step directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="its tokenizer (default: the checkpoint's tokenizer/ or RUN_DIR/tokenizer)")
    p.add_argument("--separator", metavar="TOKEN",
                   help="the pair separator (one id of the tokenizer) the synthesizer was tuned on; default: the one "
                        "the sidecar of its pair data records (tools/make_pair_dataset.py --separator), else "
                        "<|sep|>; refused when it differs from the recorded one")
    p.add_argument("--corpus", required=True, metavar="PREFIX",
                   help="the real corpus the seed documents are drawn from (tokenized with that tokenizer)")
    p.add_argument("--output-prefix", required=True, metavar="OUT",
                   help="writes OUT.bin/.idx/.json and OUT.provenance.parquet")
    p.add_argument("--num-docs", type=int, metavar="N",
                   help="draw N samples (the output holds N minus the empty ones); give this or --tokens")
    p.add_argument("--tokens", type=int, metavar="T",
                   help="draw whole shards until the output holds at least T tokens (EOD included)")
    p.add_argument("--temperature", type=nonnegative_float, default=d.temperature,
                   help="softmax temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens (default 0 = all)")
    p.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=d.top_p,
                   help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the seed draws and every sample's stream (default 0)")
    p.add_argument("--max-seed-tokens", type=int, metavar="L1",
                   help="seed tokens in each prompt (default: (max_seq_len - 1) // 2, or what --max-new-tokens leaves)")
    p.add_argument("--max-new-tokens", type=int, metavar="L2",
                   help="most tokens sampled per document (default: what the prompt leaves of the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per sampling batch (default {d.batch_size}); does not change the output")
    p.add_argument("--shard-docs", type=int, default=d.shard_docs,
                   help=f"samples per shard, the unit of resumable work and of sharing over ranks (default "
                        f"{d.shard_docs})")
    p.add_argument("--work-dir", metavar="W", help="where shards and the manifest go (default OUT.work/; one that "
                   "is, holds or sits inside an input is refused)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after a successful run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (default: refuse, exit 2); an output that is an input (the corpus, "
                        "the checkpoint, the tokenizer) is refused regardless")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the local backend runs (auto: CUDA when available; a rank uses its local GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The endpoint serves the synthesizer itself: the flags above give its sampling and size the run, so the shared
    # --temperature/--max-tokens and the price/budget flags are not taken here. Only --base-url, --model and
    # --endpoint-prompt decide the output; the other defaults are LLMSettings' but a longer --timeout.
    e = add_llm_arguments(
        p, required=False, title="OpenAI-compatible completions backend (instead of sampling here)",
        defaults=LLMSettings(timeout_s=300.0), aliases={"base-url": ("--endpoint",), "model": ("--served-model",)},
        omit=("temperature", "max-tokens", "price-in", "price-out", "budget-tokens", "budget-usd"),
        helps={"base-url": "the API root, e.g. http://localhost:8000/v1 (vLLM); --endpoint is the same flag",
               "model": "the model name the server serves (vLLM --served-model-name); --served-model is the same flag",
               "max-attempts": "requests per sample that got a reply (retries after empty or unreadable ones included) "
                               "before the run stops (default 5); transient failures do not count, see "
                               "--transient-budget-s",
               "transient-budget-s": "seconds a sample keeps retrying transient failures (429 with its Retry-After, "
                                     "408, 5xx, timeouts, dropped connections) before the run stops, resumable "
                                     "(default 600)"})
    e.add_argument("--endpoint-prompt", choices=["ids", "text"], default="ids",
                   help="send each prompt as token ids (default; exact, vLLM accepts them) or as decoded text")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The work directory (default OUT.work/) is an output too: it is created, filled and, after a success, removed.
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix),
                           "--work-dir": directory(args.work_dir or f"{args.output_prefix}.work")},
                  {"--corpus": prefix(args.corpus), "--checkpoint": run_dir(args.checkpoint),
                   "--tokenizer": args.tokenizer})
    if (args.base_url is None) != (args.model is None):
        print("error: --endpoint and --served-model go together (or --base-url and --model)", file=sys.stderr)
        return 2
    settings = SynthSettings(num_docs=args.num_docs, tokens=args.tokens, seed=args.seed, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, max_seed_tokens=args.max_seed_tokens,
                             max_new_tokens=args.max_new_tokens, shard_docs=args.shard_docs, batch_size=args.batch_size)
    try:
        settings.check()
        endpoint = settings_from_args(args) if args.base_url else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = init_distributed(tp=1, device=args.device if endpoint is None else "cpu")
    try:
        summary = synthesize(args.checkpoint, args.corpus, args.output_prefix, settings, tokenizer=args.tokenizer,
                             work_dir=args.work_dir, overwrite=args.overwrite, keep_work=args.keep_work,
                             device=info.device, dtype=getattr(torch, args.dtype), endpoint=endpoint,
                             prompt_format=args.endpoint_prompt, progress=not args.no_progress,
                             separator=args.separator)
    except EndpointError as e:
        print(f"error: {e}; the finished shards are kept, run the same command again to resume", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, TokenizerError, IndexedDatasetError, PrefixOutputError, ShardError,
            RunDirBusy, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the finished shards are kept, run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        destroy_distributed()
    if info.is_main:
        if summary.get("already_complete"):
            print(f"{args.output_prefix}: already complete (a finished run with these settings)")
        else:
            print(f"wrote {args.output_prefix}.bin/.idx/.json and .provenance.parquet: {summary['generated']:,} "
                  f"documents, "
                  f"{summary['tokens']:,} tokens from {summary['requested']:,} samples; dropped "
                  f"{summary['empty_dropped']:,} empty and {summary['out_of_vocab_dropped']:,} with unknown ids; "
                  f"{summary['truncated']:,} hit --max-new-tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
