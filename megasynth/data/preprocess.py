"""Tokenize input files into an indexed-dataset prefix: the library behind tools/preprocess_data.py.

    from megasynth.data.preprocess import preprocess
    from megasynth.data.readers import ReaderOptions
    summary = preprocess(["corpus/*.jsonl.zst"], "data/web", "tok/", options=ReaderOptions(json_key="text"),
                         workers=8)
    summary["documents"], summary["tokens"]

Workers, input order, errors and the sidecar keys: docs/format.md ("Written by preprocessing").
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.cli import check_outputs, file, refuse_without_output
from megasynth.cli import prefix as prefix_spec
from megasynth.data import prefix as prefix_files
from megasynth.data.indexed import (IndexedDatasetError, IndexedDatasetWriter, PrefixOutputError, bin_path,
    check_not_empty, idx_path, mask_path, sidecar_path, smallest_token_dtype)
from megasynth.data.readers import BadInputError, Chunk, InputError, InputReader, Parsed, ReaderOptions, parse_chunk
from megasynth.procs import die_with_parent
from megasynth.tokenizer import Tokenizer, TokenizerError, limit_tokenizer_threads, load_tokenizer


# -- the work a worker does -----------------------------------------------------------------------------------------
@dataclass
class EncodedChunk:
    tokens: np.ndarray  # every kept document's ids, concatenated
    lengths: np.ndarray  # int64 per document
    mask: np.ndarray | None  # loss-masked prefixes (megasynth.data.sft): bool, as long as tokens, True = a target
    parsed: Parsed  # positions of the kept records and the skips, without the texts
    truncated: int = 0


class ChunkEncoder:
    """Parses a chunk and tokenizes its documents."""

    def __init__(self, tokenizer: Tokenizer, options: ReaderOptions, add_bos: bool, append_eod: bool, dtype):
        self.tokenizer, self.options = tokenizer, options
        self.add_bos, self.append_eod, self.dtype = add_bos, append_eod, np.dtype(dtype)

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        parsed = parse_chunk(chunk, self.options)
        # Documents are text: a literal "<|endoftext|>" in a web page is not an end of document.
        tokens, lengths = self.tokenizer.encode_batch_array(
            parsed.texts, add_bos=self.add_bos, append_eod=self.append_eod, dtype=self.dtype, parse_special=False)
        parsed.texts = []  # the texts need not travel back to the main process
        return EncodedChunk(tokens, lengths, None, parsed)

    def worker_spec(self, tokenizer_path: str | os.PathLike) -> tuple:
        """(build, args), both picklable: a worker process rebuilds this encoder as build(*args). Other
        encoders (megasynth.data.sft) define their own, so encoded_chunks runs any of them."""
        return build_encoder, (ChunkEncoder, os.fspath(tokenizer_path), self.options, self.add_bos, self.append_eod,
                               self.dtype.name)


def build_encoder(cls, tokenizer_path: str, *args):
    """cls(the tokenizer at tokenizer_path, *args): how a worker process rebuilds an encoder (its worker_spec)."""
    return cls(load_tokenizer(tokenizer_path), *args)


_worker_encoder = None  # the encoder of this worker process (a ChunkEncoder or another worker_spec's)


def _init_worker(parent_pid: int, build, build_args: tuple) -> None:
    global _worker_encoder
    # A SIGKILLed preprocess_data must not leave its workers (and the resource tracker they keep alive) behind.
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the main process handles it (aborting the writer, stopping the
    # pool); workers ignoring it spares the terminal one traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_tokenizer_threads(1)  # parallelism comes from the worker processes; threads would oversubscribe
    _worker_encoder = build(*build_args)


def _encode_in_worker(chunk: Chunk):
    return _worker_encoder(chunk)


def encoded_chunks(reader: InputReader, encoder, tokenizer_path: str | os.PathLike, workers: int):
    """encoder(chunk) (an EncodedChunk) per chunk, in input order; with workers > 0
    the encoding runs in a process pool, each worker holding the encoder its worker_spec() rebuilds.

    At most 2 * workers + 2 chunks are in flight, so memory stays bounded however large the input is
    (Pool.imap would read the whole input ahead into its task queue).
    """
    if workers == 0:
        yield from map(encoder, reader.chunks())
        return
    # spawn, not fork: a forked child would inherit the parent's tokenizer thread pools in an unknown state.
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(os.getpid(), *encoder.worker_spec(tokenizer_path)))
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


# -- the output -------------------------------------------------------------------------------------------------------
def check_output_prefix(prefix: str | os.PathLike, reader: InputReader, *, overwrite: bool = False) -> list[Path]:
    """Refuse an output that cannot be written, would overwrite one of the inputs, or exists while `overwrite`
    is false (OutputExistsError), before any work.

    Returns the output directory and those of its ancestors that do not exist yet, deepest first: the run
    creates them, and removes them again if it fails.
    """
    prefix = os.fspath(prefix)
    parent = Path(prefix).parent
    missing, existing = [], parent
    while not existing.exists():  # also false below a regular file ("file.txt/x"): the walk stops at that file
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        if existing == parent:
            raise InputError(f"{prefix}: the output directory {parent} is not a directory")
        raise InputError(f"{prefix}: cannot create the output directory {parent}: {existing} is not a directory")
    prefix_files.check_output_prefix(prefix, {"": [file(f.path) for f in reader.files]}, overwrite=overwrite,
                                     error=InputError)
    return missing


def remove_created_dirs(dirs: list[Path]) -> None:
    """Undo the directories a failed run created (check_output_prefix's list, deepest first); stop at one that
    is not empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


# -- the run ----------------------------------------------------------------------------------------------------------
def prefix_metadata(tokenizer: Tokenizer, *, add_bos: bool, append_eod: bool,
                    created_by: str = "preprocess_data") -> dict:
    """The sidecar entries of a preprocessed prefix that the writer does not add (one home: the single-process run,
    the publish step of workers, megasynth.data.preprocess_units, and preprocess_sft write the same keys)."""
    return {"tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
            "append_eod": append_eod, "add_bos": add_bos, "created_by": created_by}


def open_run(inputs, output_prefix: str, tokenizer_path, options: ReaderOptions, *, add_bos: bool,
             overwrite: bool) -> tuple[InputReader, list[Path], Tokenizer]:
    """(reader, the output directories to create: check_output_prefix, tokenizer) of a preprocessing run, after
    every check that needs no tokenizing."""
    reader = InputReader(inputs, options)
    missing_dirs = check_output_prefix(output_prefix, reader, overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    if add_bos and tokenizer.bos_id is None:
        raise TokenizerError(f"{tokenizer_path}: add_bos (--add-bos) was asked for but this tokenizer has no BOS token")
    return reader, missing_dirs, tokenizer


def read_stats(stats, tokens: int) -> dict:
    """The sidecar's "stats" of a preprocessed prefix."""
    return {"documents": stats.documents, "tokens": tokens, "skipped_empty": stats.skipped_empty,
            "skipped_bad": stats.skipped_bad}


def preprocess(
    inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike, tokenizer_path: str | os.PathLike, *,
    options: ReaderOptions | None = None, add_bos: bool = False, append_eod: bool = True, workers: int = 1,
    progress: bool = True, overwrite: bool = False, allow_empty: bool = False,
) -> dict:
    """Tokenize inputs into output_prefix (.bin/.idx/.json); return the run's summary.

    options: how to read the inputs (format, JSON key, text mode, skip_bad, batch_size = records per chunk).
    workers: tokenizing processes, each single-threaded; 0 tokenizes in this process with the tokenizer
    library's own threads. The summary holds documents, tokens, skipped_empty, skipped_bad, bad_examples
    (messages of the first skipped records), input_bytes, output_bytes and seconds.
    Raises InputError, BadInputError or TokenizerError on bad input, leaving no output; OutputExistsError when
    the output prefix exists and not `overwrite`, EmptyOutputError when no document was read and not
    `allow_empty` (the prefix is published atomically: docs/format.md, "Publishing a prefix").
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    started = time.perf_counter()
    options = options or ReaderOptions()
    output_prefix = os.fspath(output_prefix)
    reader, missing_dirs, tokenizer = open_run(inputs, output_prefix, tokenizer_path, options, add_bos=add_bos,
                                               overwrite=overwrite)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    encoder = ChunkEncoder(tokenizer, options, add_bos, append_eod, dtype)
    metadata = prefix_metadata(tokenizer, add_bos=add_bos, append_eod=append_eod)
    totals = write_encoded(output_prefix, reader, encoded_chunks(reader, encoder, tokenizer_path, workers), dtype=dtype,
                           metadata=metadata, missing_dirs=missing_dirs, progress=progress, desc="preprocess",
                           unit="docs", started=started, allow_empty=allow_empty)
    return {**read_stats(reader.stats, totals["tokens"]), "bad_examples": reader.stats.bad_examples,
            "input_bytes": reader.total_bytes, "output_bytes": totals["output_bytes"],
            "seconds": time.perf_counter() - started}


def write_encoded(output_prefix: str, reader: InputReader, results, *, dtype, metadata: dict, missing_dirs: list[Path],
                  progress: bool, desc: str, unit: str, started: float, loss_mask: bool = False,
                  allow_empty: bool = False) -> dict:
    """Write `results` (EncodedChunks in input order; closed at the end) as the prefix, with the sidecar's
    "sources" and "stats"; on any error remove the directories the run created. Returns the totals: tokens,
    target_tokens and truncated (loss-masked prefixes) and output_bytes."""
    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    tokens_total = targets_total = truncated = 0
    try:
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetWriter(output_prefix, dtype, metadata=metadata, loss_mask=loss_mask) as writer:
            for out in results:
                reader.stats.record(out.parsed)
                writer.add_flat(out.tokens, out.lengths, loss_mask=out.mask)
                tokens_total += int(out.tokens.size)
                if loss_mask:
                    targets_total += int(np.count_nonzero(out.mask))
                truncated += out.truncated
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{reader.stats.documents / elapsed:,.0f} {unit}/s, "
                                    f"{tokens_total / elapsed:,.0f} tok/s", refresh=False)
                bar.update(out.parsed.done_bytes - bar.n)
            s = reader.stats
            check_not_empty(output_prefix, writer.num_documents, allow_empty=allow_empty)  # raising aborts the writer
            stats = {"documents": s.documents, "tokens": tokens_total,
                     **({"target_tokens": targets_total} if loss_mask else {}),
                     "skipped_empty": s.skipped_empty, "skipped_bad": s.skipped_bad,
                     **({"truncated": truncated} if loss_mask else {})}
            writer.finalize(metadata={"sources": reader.sources, "stats": stats})
    except BaseException:
        remove_created_dirs(missing_dirs)  # the writer has already removed its temp files
        raise
    finally:
        results.close()  # on an error: stop the workers now, not when the generator is garbage-collected
        bar.close()
    files = [bin_path(output_prefix), idx_path(output_prefix), sidecar_path(output_prefix)]
    if loss_mask:
        files.append(mask_path(output_prefix))
    return {"tokens": tokens_total, "target_tokens": targets_total, "truncated": truncated,
            "output_bytes": sum(p.stat().st_size for p in files)}


def parse_cli_args(parser, argv: list[str] | None):
    """A preprocessing tool's arguments; one line and exit code 2 when --output-prefix would overwrite an input
    or the worker flags are out of range."""
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output-prefix": prefix_spec(args.output_prefix)},
                  {"--input": args.input, "--tokenizer": args.tokenizer})
    if args.workers < 0 or args.batch_size < 1 or args.max_bad_lines_shown < 0:
        parser.error("--workers must be >= 0, --batch-size >= 1 and --max-bad-lines-shown >= 0")
    return args


def run_for_cli(output_prefix: str, call, *, files: str, summary_line,
                bad_input: tuple[type[BaseException], ...] = (), other_outcome=None) -> int:
    """Run a preprocessing `call()` as the command-line tools report it; returns the exit code.

    Success prints the --skip-bad-lines report (the first few skipped records) to stderr and `wrote
    PREFIX{files}: {summary_line(summary)}`. An existing or empty output is one line and exit 2; bad input
    (readers, tokenizer, format, and the extra `bad_input` types) one line plus "no output written" and exit 2;
    an unwritable output or a full disk likewise; a dead worker 1; Ctrl-C 130. The library guarantees that no
    partial prefix is left in any of these cases. `other_outcome(summary)`: a line to print instead of "wrote"
    when the call wrote no output by design (a worker that left publishing to another), else None."""
    try:
        summary = call()
    except PrefixOutputError as e:  # an existing or empty output: the one line says what to do
        print(f"{e}", file=sys.stderr)
        return 2
    # OSError: e.g. the output directory is not writable, the disk is full
    except (BadInputError, InputError, TokenizerError, IndexedDatasetError, *bad_input, OSError) as e:
        return refuse_without_output(e, output_prefix)
    except BrokenProcessPool:
        print("a worker process died (out of memory?); no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; no output written to {output_prefix}", file=sys.stderr)
        return 130
    line = other_outcome(summary) if other_outcome is not None else None
    if line is not None:
        print(line)
        return 0
    if summary["skipped_bad"]:
        shown = summary["bad_examples"]
        print(f"skipped {summary['skipped_bad']:,} bad records (--skip-bad-lines); the first {len(shown)}:",
              file=sys.stderr)
        for message in shown:
            print(f"  {message}", file=sys.stderr)
    print(f"wrote {output_prefix}{files}: {summary_line(summary)}")
    return 0
