"""Tokenize JSONL / Parquet / text files into an indexed-dataset prefix (PREFIX.bin, PREFIX.idx, PREFIX.json).

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --tokenizer tok/ --output-prefix data/web --workers 8
    python tools/preprocess_data.py --input books/ --text-mode paragraph --tokenizer tok.model --output-prefix data/books

One document per JSONL line / Parquet row / text file, line or paragraph (see --text-mode); the end-of-document
id is appended to each (--no-append-eod to leave it out). The main process reads the input and writes the
output; --workers processes parse and tokenize batches of --batch-size records, and their results are
written in input order, so the output is byte-identical whatever the number of workers.

Bad input (invalid JSON or UTF-8, a missing key, a value that is not a string) stops the run with
`FILE:LINE: what is wrong` and exit code 2, and leaves no output; --skip-bad-lines skips such records and
reports them. Empty documents are skipped and counted. The sidecar records the tokenizer's identity, the
source files with their sizes and sha256, and the counts; it holds no timings, so reruns are identical.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    bin_path,
    idx_path,
    sidecar_path,
    smallest_token_dtype,
)
from megasynth.data.readers import (
    BadInputError,
    Chunk,
    InputError,
    InputReader,
    Parsed,
    ReaderOptions,
    add_input_arguments,
    parse_chunk,
    reader_options_from_args,
)
from megasynth.tokenizer import Tokenizer, TokenizerError, limit_tokenizer_threads, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json; the directory must exist")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding one")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the tokenizer's end-of-document id to every document (default: append)")
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS id to every document")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizing processes, each single-threaded (default 1); 0 tokenizes in the main "
                             "process with the tokenizer library's own threads")
    parser.add_argument("--batch-size", type=int, default=1024, metavar="N",
                        help="records per batch handed to a worker (default 1024)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# -- the work a worker does -----------------------------------------------------------------------------------------
class ChunkEncoder:
    """Parses a chunk and tokenizes its documents into (tokens, lengths, Parsed without the texts)."""

    def __init__(self, tokenizer: Tokenizer, options: ReaderOptions, add_bos: bool, append_eod: bool, dtype):
        self.tokenizer, self.options = tokenizer, options
        self.add_bos, self.append_eod, self.dtype = add_bos, append_eod, np.dtype(dtype)

    def __call__(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray, Parsed]:
        parsed = parse_chunk(chunk, self.options)
        tokens, lengths = self.tokenizer.encode_batch_array(
            parsed.texts, add_bos=self.add_bos, append_eod=self.append_eod, dtype=self.dtype)
        parsed.texts = []  # the texts need not travel back to the main process
        return tokens, lengths, parsed


_worker_encoder: ChunkEncoder | None = None


def _init_worker(tokenizer_path: str, options: ReaderOptions, add_bos: bool, append_eod: bool, dtype: str) -> None:
    global _worker_encoder
    # Ctrl-C reaches the whole process group: the main process handles it (aborting the writer, stopping the
    # pool); workers ignoring it spares the terminal one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_tokenizer_threads(1)  # parallelism comes from the worker processes; threads would oversubscribe
    _worker_encoder = ChunkEncoder(load_tokenizer(tokenizer_path), options, add_bos, append_eod, dtype)


def _encode_in_worker(chunk: Chunk):
    return _worker_encoder(chunk)


def encoded_chunks(reader: InputReader, encoder: ChunkEncoder, tokenizer_path: str, workers: int):
    """(tokens, lengths, parsed) per chunk, in input order; with workers > 0 the encoding runs in a process pool.

    At most 2 * workers + 2 chunks are in flight, so memory stays bounded however large the input is
    (Pool.imap would read the whole input ahead into its task queue).
    """
    if workers == 0:
        yield from map(encoder, reader.chunks())
        return
    # spawn, not fork: a forked child would inherit the parent's tokenizer thread pools in an unknown state.
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(tokenizer_path, encoder.options, encoder.add_bos, encoder.append_eod, encoder.dtype.name))
    pending: deque = deque()
    try:
        for chunk in reader.chunks():
            pending.append(executor.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- the run ----------------------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return f"{n:,.1f} TiB"  # pragma: no cover


def check_output_prefix(prefix: str, reader: InputReader) -> None:
    """Refuse an output that cannot be written or would overwrite one of the inputs, before any work."""
    parent = Path(prefix).parent
    if not parent.is_dir():
        raise InputError(f"{prefix}: output directory {parent} does not exist")
    if Path(prefix).is_dir():
        raise InputError(f"{prefix}: is a directory; --output-prefix names files PREFIX.bin/.idx/.json")
    outputs = {p.resolve() for p in (bin_path(prefix), idx_path(prefix), sidecar_path(prefix))}
    for f in reader.files:
        if f.path.resolve() in outputs:
            raise InputError(f"{prefix}: the output would overwrite the input {f.path}")


def preprocess(args: argparse.Namespace) -> dict:
    """Run the tool; returns the summary. Raises InputError, BadInputError, TokenizerError on bad input."""
    started = time.perf_counter()
    options = reader_options_from_args(args, batch_size=args.batch_size)
    reader = InputReader(args.input, options)
    check_output_prefix(args.output_prefix, reader)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.add_bos and tokenizer.bos_id is None:
        raise TokenizerError(f"{args.tokenizer}: --add-bos was given but this tokenizer has no BOS token")
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    encoder = ChunkEncoder(tokenizer, options, args.add_bos, args.append_eod, dtype)
    metadata = {
        "tokenizer": tokenizer.identity(),
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "append_eod": args.append_eod,
        "add_bos": args.add_bos,
        "created_by": "preprocess_data",
    }
    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
               disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
    tokens_total = 0
    results = encoded_chunks(reader, encoder, args.tokenizer, args.workers)
    try:
        with IndexedDatasetWriter(args.output_prefix, dtype, metadata=metadata) as writer:
            for tokens, lengths, parsed in results:
                reader.record(parsed)
                if lengths.size:
                    writer.add_documents(np.split(tokens, np.cumsum(lengths[:-1])))
                tokens_total += int(tokens.size)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{reader.stats.documents / elapsed:,.0f} docs/s, "
                                    f"{tokens_total / elapsed:,.0f} tok/s", refresh=False)
                bar.update(parsed.done_bytes - bar.n)
            stats = reader.stats
            writer.finalize(metadata={
                "sources": reader.sources,
                "stats": {"documents": stats.documents, "tokens": tokens_total,
                          "skipped_empty": stats.skipped_empty, "skipped_bad": stats.skipped_bad},
            })
    finally:
        results.close()  # on an error: stop the workers now, not when the generator is garbage-collected
        bar.close()
    seconds = time.perf_counter() - started
    out_bytes = sum(p.stat().st_size for p in (bin_path(args.output_prefix), idx_path(args.output_prefix),
                                                sidecar_path(args.output_prefix)))
    return {"documents": stats.documents, "tokens": tokens_total, "skipped_empty": stats.skipped_empty,
            "skipped_bad": stats.skipped_bad, "bad_examples": stats.bad_examples, "input_bytes": reader.total_bytes,
            "output_bytes": out_bytes, "seconds": seconds}


def summary_line(s: dict) -> str:
    sec = max(s["seconds"], 1e-9)
    return (f"{s['documents']:,} documents, {s['tokens']:,} tokens, skipped {s['skipped_empty']:,} empty and "
            f"{s['skipped_bad']:,} bad | input {_fmt_bytes(s['input_bytes'])}, output {_fmt_bytes(s['output_bytes'])}"
            f" | {s['seconds']:.1f} s, {s['documents'] / sec:,.0f} docs/s, {s['tokens'] / sec:,.0f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 0 or args.batch_size < 1 or args.max_bad_lines_shown < 0:
        print("--workers must be >= 0, --batch-size >= 1 and --max-bad-lines-shown >= 0", file=sys.stderr)
        return 2
    try:
        summary = preprocess(args)
    except (BadInputError, InputError, TokenizerError, IndexedDatasetError) as e:
        print(f"{e}", file=sys.stderr)
        print(f"no output written to {args.output_prefix}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output directory is not writable, the disk is full
        print(f"{e.filename or args.output_prefix}: {e.strerror or e}", file=sys.stderr)
        print(f"no output written to {args.output_prefix}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("a worker process died (out of memory?); no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; no output written to {args.output_prefix}", file=sys.stderr)
        return 130
    if summary["skipped_bad"]:
        shown = summary["bad_examples"]
        print(f"skipped {summary['skipped_bad']:,} bad records (--skip-bad-lines); the first {len(shown)}:",
              file=sys.stderr)
        for message in shown:
            print(f"  {message}", file=sys.stderr)
    print(f"wrote {args.output_prefix}.bin/.idx/.json: {summary_line(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
