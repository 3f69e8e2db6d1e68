"""Train a tokenizer on JSONL / Parquet / text files: byte-level BPE (Hugging Face) or SentencePiece.

    python tools/train_tokenizer.py --input corpus/train.jsonl --output tok/ --type bpe --vocab-size 32000
    python tools/train_tokenizer.py --input 'books/*.txt' --text-mode paragraph --output tok/ \\
        --type sentencepiece --vocab-size 16000

bpe writes OUTPUT/tokenizer.json and tokenizer_config.json (end of document: <|endoftext|>, id 0), which
transformers' AutoTokenizer.from_pretrained(OUTPUT) also loads; sentencepiece writes OUTPUT/tokenizer.model
and tokenizer.vocab (unk 0, BOS 1, EOS 2 = end of document, byte fallback, no normalization). Either loads
with megasynth.tokenizer.load_tokenizer(OUTPUT) and tools/preprocess_data.py --tokenizer OUTPUT.
The input flags are those of tools/preprocess_data.py. The tokenizer files appear in OUTPUT as one set (other
files there are left alone); a tokenizer already there is replaced only with --overwrite. Exit code 2 on bad
input, with `FILE:LINE: message`, on an OUTPUT that is, holds or sits inside an input, and on an existing
tokenizer without --overwrite (one line, before anything is read or written).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from tqdm import tqdm

from megasynth.chat import BUILTIN_TEMPLATE, TRAINING_SPECIAL_TOKENS
from megasynth.cli import ToolParser, add_input_arguments, check_outputs, directory, reader_options_from_args
from megasynth.data.readers import BadInputError, InputError, InputReader
from megasynth.tokenizer import (
    TOKENIZER_FILES, TokenizerError, train_bpe_tokenizer, train_sentencepiece_tokenizer,
)


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer files to")
    parser.add_argument("--type", required=True, choices=("bpe", "sentencepiece"),
                        help="bpe: byte-level BPE with Hugging Face tokenizers; sentencepiece: a SentencePiece model")
    parser.add_argument("--vocab-size", required=True, type=int, metavar="N",
                        help="vocabulary size, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, metavar="N",
                        help="bpe: merge only pairs seen at least N times (default 2; SentencePiece has no such knob)")
    parser.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                        help="extra special tokens that are never split (bpe: after <|endoftext|>; "
                             "sentencepiece: user-defined symbols)")
    parser.add_argument("--chat-tokens", action="store_true",
                        help="add the special tokens of the built-in chat template and of pair records "
                             f"({', '.join(TRAINING_SPECIAL_TOKENS)}; see megasynth/chat.py) for "
                             "tools/preprocess_sft.py; bpe also writes that template as chat_template in "
                             "tokenizer_config.json, so transformers' apply_chat_template formats chats the same way")
    parser.add_argument("--sentencepiece-model-type", choices=("unigram", "bpe"), default="unigram",
                        help="sentencepiece: the segmentation model (default unigram)")
    parser.add_argument("--max-documents", type=int, default=0, metavar="N",
                        help="train on the first N documents only (default 0: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a tokenizer already in --output (its tokenizer files only; other files there "
                             "stay; default: refuse, exit 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def counted(texts, counter: list[int]):
    for text in texts:
        counter[0] += 1
        yield text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": directory(args.output, TOKENIZER_FILES)}, {"--input": args.input},
                  overwrite=args.overwrite)
    if args.vocab_size < 1 or args.max_documents < 0 or args.min_frequency < 0:
        print("--vocab-size must be >= 1, --max-documents and --min-frequency >= 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    specials = list(dict.fromkeys([*args.special_tokens, *(TRAINING_SPECIAL_TOKENS if args.chat_tokens else ())]))
    used = [0]  # documents the trainer took (reader.stats counts whole chunks, past --max-documents)
    try:
        reader = InputReader(args.input, reader_options_from_args(args))
        texts = (text for text, _ in reader)
        if args.max_documents:
            texts = itertools.islice(texts, args.max_documents)
        texts = tqdm(counted(texts, used), unit=" docs", desc="reading", disable=args.no_progress, file=sys.stderr)
        if args.type == "bpe":
            tok = train_bpe_tokenizer(texts, args.output, vocab_size=args.vocab_size,
                                      min_frequency=args.min_frequency, special_tokens=specials,
                                      chat_template=BUILTIN_TEMPLATE if args.chat_tokens else None)
        else:
            tok = train_sentencepiece_tokenizer(texts, args.output, vocab_size=args.vocab_size,
                                                model_type=args.sentencepiece_model_type,
                                                special_tokens=specials)
        texts.close()
    except (BadInputError, InputError, TokenizerError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    stats = reader.stats
    if stats.skipped_bad:
        print(f"skipped {stats.skipped_bad:,} bad records; the first {len(stats.bad_examples)}:", file=sys.stderr)
        for message in stats.bad_examples:
            print(f"  {message}", file=sys.stderr)
    print(f"wrote {args.type} tokenizer to {args.output}: vocab_size {tok.vocab_size:,}, eod_id {tok.eod_id}, "
          f"trained on {used[0]:,} documents in {time.perf_counter() - started:.1f} s")
    if tok.vocab_size < args.vocab_size:
        # BPE stops merging when no pair is left that occurs --min-frequency times: a small corpus cannot fill a
        # large vocabulary. Say so, since model.vocab_size and the embedding are sized from it.
        print(f"warning: asked for --vocab-size {args.vocab_size:,} but the corpus gave only {tok.vocab_size:,} ids "
              f"({used[0]:,} documents); give more text, or a smaller --vocab-size, or a lower --min-frequency",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
