"""SBP stage 3: nearest-neighbour pairs of a corpus -> a loss-masked prefix to tune the synthesizer on.

    python tools/make_pair_dataset.py --pairs runs/sbp/pairs.parquet --corpus data/real --output-prefix data/pairs \\
        --max-seed-tokens 512 --max-target-tokens 512

Each row (seed, target) of the pair table (tools/build_pairs.py) becomes "seed tokens, <|sep|>, target tokens,
EOD" with the loss on the target and the EOD only: the layout of tools/preprocess_sft.py's `pair` format, so the
tokens are the same as for a JSONL record {"source": seed text, "target": target text}. The tokenizer (the one the
corpus sidecar names, or --tokenizer) must have <|sep|> as one token (tools/train_tokenizer.py --chat-tokens), or
--separator names another token that is one id: a pretrained tokenizer (Llama 3, Qwen, a WordPiece vocabulary)
has no <|sep|>, so give it one of its reserved or unused special tokens, e.g. --separator
'<|reserved_special_token_0|>'. The sidecar records the separator (sft.pair_separator: text and id) and
tools/synthesize.py prompts the tuned synthesizer with the same one.
Train on the output with `packing = "pack"` (examples/sbp/synthesizer.toml). The output is in pair-table order and
byte-identical on reruns; it is published atomically, and an existing one is refused unless --overwrite.
Bad input (an index outside the corpus: `PAIRS: row N: ...` counting rows from 0, a pair table built from another
corpus, a separator that is not one token, an empty table) stops with one line and exit code 2, writing nothing.
Library: megasynth.synth.sbp.pair_dataset.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, check_outputs, file, prefix
from megasynth.data.indexed import IndexedDatasetError, PrefixOutputError
from megasynth.synth.corpus import CorpusError
from megasynth.synth.sbp.pair_dataset import make_pair_dataset
from megasynth.tokenizer import TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, metavar="PAIRS.parquet",
                   help="the pair table: int64 columns seed and target, document indices of --corpus")
    p.add_argument("--corpus", required=True, metavar="PREFIX", help="the corpus prefix the pairs index")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin/.idx/.mask/.json; missing directories are created")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the corpus's tokenizer (default: the one its sidecar names; either must match the sidecar)")
    p.add_argument("--separator", metavar="TOKEN",
                   help="the token between seed and target (default <|sep|>); any token that is one id of the "
                        "tokenizer and not its EOD, e.g. a reserved special token of a pretrained tokenizer")
    p.add_argument("--max-seed-tokens", type=int, metavar="L1",
                   help="keep the first L1 tokens of each seed document (default: all)")
    p.add_argument("--max-target-tokens", type=int, metavar="L2",
                   help="keep the first L2 tokens of each target document (default: all); a cut target's EOD is "
                        "context, not a target")
    p.add_argument("--both-directions", action="store_true",
                   help="also write (target, seed) right after each (seed, target)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output prefix (default: refuse); never an input (always refused)")
    p.add_argument("--allow-empty", action="store_true",
                   help="write an empty prefix for a pair table with no rows (default: an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix)},
                  {"--pairs": file(args.pairs), "--corpus": prefix(args.corpus), "--tokenizer": args.tokenizer})
    try:
        s = make_pair_dataset(args.pairs, args.corpus, args.output_prefix, tokenizer=args.tokenizer,
                              max_seed_tokens=args.max_seed_tokens, max_target_tokens=args.max_target_tokens,
                              both_directions=args.both_directions, overwrite=args.overwrite,
                              allow_empty=args.allow_empty, progress=not args.no_progress, separator=args.separator)
    except (CorpusError, IndexedDatasetError, TokenizerError, PrefixOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.output_prefix}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx/.mask/.json: {s['sequences']:,} sequences from {s['pairs']:,} pairs, "
          f"{s['tokens']:,} tokens ({s['target_tokens']:,} targets); skipped {s['skipped_empty']:,} with an empty "
          f"document; cut {s['truncated_seeds']:,} seeds and {s['truncated_targets']:,} targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
