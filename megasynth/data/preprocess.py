"""Tokenize input files into an indexed-dataset prefix: the library behind tools/preprocess_data.py.

    from megasynth.data.preprocess import preprocess
    from megasynth.data.readers import ReaderOptions
    summary = preprocess(["corpus/*.jsonl.zst"], "data/web", "tok/", options=ReaderOptions(json_key="text"),
                         workers=8)
    summary["documents"], summary["tokens"]

The main process reads raw chunks (megasynth.data.readers) and writes the prefix; `workers` processes parse and
tokenize the chunks (ChunkEncoder), and their results are written in input order, so the output is
byte-identical whatever the number of workers. Each chunk arrives as one flat token array plus per-document
lengths and goes to the writer with IndexedDatasetWriter.add_flat. The output directory is created when
missing (and removed again, if it is still empty, when the run fails). The sidecar keys written here are
listed in docs/format.md.

Bad input raises BadInputError (`FILE:LINE: what is wrong`), InputError (a path that names nothing usable)
or TokenizerError, and leaves no output.
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
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.cli import file, overlap_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    check_not_empty,
    check_output_free,
    idx_path,
    sidecar_path,
    smallest_token_dtype,
)
from megasynth.data.readers import Chunk, InputError, InputReader, Parsed, ReaderOptions, parse_chunk
from megasynth.procs import die_with_parent
from megasynth.tokenizer import Tokenizer, TokenizerError, limit_tokenizer_threads, load_tokenizer


# -- the work a worker does -----------------------------------------------------------------------------------------
class ChunkEncoder:
    """Parses a chunk and tokenizes its documents into (tokens, lengths, Parsed without the texts)."""

    def __init__(self, tokenizer: Tokenizer, options: ReaderOptions, add_bos: bool, append_eod: bool, dtype):
        self.tokenizer, self.options = tokenizer, options
        self.add_bos, self.append_eod, self.dtype = add_bos, append_eod, np.dtype(dtype)

    def __call__(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray, Parsed]:
        parsed = parse_chunk(chunk, self.options)
        # Documents are text: a literal "<|endoftext|>" in a web page is not an end of document (issue 19).
        tokens, lengths = self.tokenizer.encode_batch_array(
            parsed.texts, add_bos=self.add_bos, append_eod=self.append_eod, dtype=self.dtype, parse_special=False)
        parsed.texts = []  # the texts need not travel back to the main process
        return tokens, lengths, parsed

    def worker_spec(self, tokenizer_path: str | os.PathLike) -> tuple:
        """(build, args), both picklable: a worker process rebuilds this encoder as build(*args). Other
        encoders (megasynth.data.sft) define their own, so encoded_chunks runs any of them."""
        return _build_chunk_encoder, (os.fspath(tokenizer_path), self.options, self.add_bos, self.append_eod,
                                      self.dtype.name)


def _build_chunk_encoder(tokenizer_path: str, options: ReaderOptions, add_bos: bool, append_eod: bool,
                         dtype: str) -> ChunkEncoder:
    return ChunkEncoder(load_tokenizer(tokenizer_path), options, add_bos, append_eod, dtype)


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
    """encoder(chunk) per chunk (for a ChunkEncoder: (tokens, lengths, parsed)), in input order; with workers > 0
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
    if Path(prefix).is_dir():
        raise InputError(f"{prefix}: is a directory; --output-prefix names files PREFIX.bin/.idx/.json")
    refusal = overlap_refusal({"": prefix_spec(prefix)}, {"": [file(f.path) for f in reader.files]})
    if refusal:  # megasynth.cli: the one overlap rule
        raise InputError(refusal)
    check_output_free(prefix, overwrite=overwrite)
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
    reader = InputReader(inputs, options)
    missing_dirs = check_output_prefix(output_prefix, reader, overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    if add_bos and tokenizer.bos_id is None:
        raise TokenizerError(f"{tokenizer_path}: add_bos (--add-bos) was asked for but this tokenizer has no BOS token")
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    encoder = ChunkEncoder(tokenizer, options, add_bos, append_eod, dtype)
    metadata = {
        "tokenizer": tokenizer.identity(),
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "append_eod": append_eod,
        "add_bos": add_bos,
        "created_by": "preprocess_data",
    }
    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    tokens_total = 0
    results = encoded_chunks(reader, encoder, tokenizer_path, workers)
    try:
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetWriter(output_prefix, dtype, metadata=metadata) as writer:
            for tokens, lengths, parsed in results:
                reader.record(parsed)
                writer.add_flat(tokens, lengths)
                tokens_total += int(tokens.size)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{reader.stats.documents / elapsed:,.0f} docs/s, "
                                    f"{tokens_total / elapsed:,.0f} tok/s", refresh=False)
                bar.update(parsed.done_bytes - bar.n)
            stats = reader.stats
            check_not_empty(output_prefix, writer.num_documents, allow_empty=allow_empty)  # raising aborts the writer
            writer.finalize(metadata={
                "sources": reader.sources,
                "stats": {"documents": stats.documents, "tokens": tokens_total,
                          "skipped_empty": stats.skipped_empty, "skipped_bad": stats.skipped_bad},
            })
    except BaseException:
        remove_created_dirs(missing_dirs)  # the writer has already removed its temp files
        raise
    finally:
        results.close()  # on an error: stop the workers now, not when the generator is garbage-collected
        bar.close()
    out_bytes = sum(p.stat().st_size for p in (bin_path(output_prefix), idx_path(output_prefix),
                                                sidecar_path(output_prefix)))
    return {"documents": stats.documents, "tokens": tokens_total, "skipped_empty": stats.skipped_empty,
            "skipped_bad": stats.skipped_bad, "bad_examples": stats.bad_examples, "input_bytes": reader.total_bytes,
            "output_bytes": out_bytes, "seconds": time.perf_counter() - started}


def run_for_cli(output_prefix: str | os.PathLike, call, bad_input: tuple[type[BaseException], ...] = ()):
    """Run a preprocessing `call()` as the command-line tools report it; returns (exit code, summary or None).

    An existing or empty output is one line and exit 2; bad input (readers, tokenizer, format, and the extra
    `bad_input` types) one line plus "no output written" and exit 2; an unwritable output or a full disk
    likewise; a dead worker 1; Ctrl-C 130. The library guarantees that no partial prefix is left in any of
    these cases."""
    from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415

    from megasynth.data.indexed import IndexedDatasetError, PrefixOutputError  # noqa: PLC0415
    from megasynth.data.readers import BadInputError  # noqa: PLC0415

    errors = (BadInputError, InputError, TokenizerError, IndexedDatasetError, *bad_input)
    try:
        return 0, call()
    except PrefixOutputError as e:  # an existing or empty output: the one line says what to do
        print(f"{e}", file=sys.stderr)
    except errors as e:
        print(f"{e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
    except OSError as e:  # e.g. the output directory is not writable, the disk is full
        print(f"{e.filename or output_prefix}: {e.strerror or e}", file=sys.stderr)
        print(f"no output written to {output_prefix}", file=sys.stderr)
    except BrokenProcessPool:
        print("a worker process died (out of memory?); no output written", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"interrupted; no output written to {output_prefix}", file=sys.stderr)
        return 130, None
    return 2, None


def print_skipped(summary: dict) -> None:
    """The --skip-bad-lines report: how many records were skipped and the first few messages."""
    if summary["skipped_bad"]:
        shown = summary["bad_examples"]
        print(f"skipped {summary['skipped_bad']:,} bad records (--skip-bad-lines); the first {len(shown)}:",
              file=sys.stderr)
        for message in shown:
            print(f"  {message}", file=sys.stderr)
