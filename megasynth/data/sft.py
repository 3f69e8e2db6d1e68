"""Instruction and pair records -> a loss-masked prefix: the library behind tools/preprocess_sft.py.

    from megasynth.data.sft import preprocess_sft
    summary = preprocess_sft(["train.jsonl"], "data/sft", "tok/", fmt="auto", max_len=2048, workers=4)
    summary["records"], summary["tokens"], summary["target_tokens"], summary["truncated"]

Record formats are megasynth.data.sft_encode's; the encoding, refusals and sidecar: docs/sft.md, docs/format.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from megasynth.data.indexed import smallest_token_dtype
from megasynth.data.preprocess import EncodedChunk, check_output_prefix, encoded_chunks, prefix_metadata, write_encoded
from megasynth.data.readers import BadInputError, InputError, InputReader, ReaderOptions, parse_json_chunk
from megasynth.data.sft_encode import ALPACA_JOIN, FORMAT_KEYS, FORMATS, SftEncoder, SftOptions, detect_format
from megasynth.tokenizer import load_tokenizer

__all__ = ["ALPACA_JOIN", "FORMATS", "FORMAT_KEYS", "EncodedChunk", "SftEncoder", "SftOptions", "detect_format",
           "preprocess_sft", "resolve_format"]

# -- the run --------------------------------------------------------------------------------------------------------
def _jsonl_reader(inputs: Sequence[str | os.PathLike], options: ReaderOptions) -> InputReader:
    reader = InputReader(inputs, options)
    for f in reader.files:
        if f.format != "jsonl":
            raise InputError(f"{f.path}: preprocess_sft reads JSONL records (.jsonl/.json/.ndjson, optionally "
                             f".gz/.zst), not {f.format}")
    return reader


def resolve_format(inputs: Sequence[str | os.PathLike], fmt: str = "auto", *, skip_bad: bool = False) -> tuple[str, str]:
    """(format, where it was decided): fmt itself, or for "auto" the format of the first record (its FILE:LINE).
    With skip_bad, unreadable lines before the first record are passed over."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {fmt!r}")
        return fmt, "given"
    reader = _jsonl_reader(inputs, ReaderOptions(batch_size=1, skip_bad=skip_bad))
    chunks = reader.chunks()
    try:
        for chunk in chunks:
            parsed, objs = parse_json_chunk(chunk, lambda obj, line: obj, skip_bad)
            if objs:
                where = parsed.locations()[0]
                found = detect_format(objs[0])
                if found is None:
                    keys = ", ".join(map(repr, list(objs[0])[:10])) or "none"
                    wanted = "; ".join(f"{f}: {', '.join(k)}" for f, k in FORMAT_KEYS.items())
                    raise BadInputError(where, f"cannot tell the record format from its keys ({keys}); expected "
                                               f"{wanted}, or pass --format")
                return found, where
    finally:
        chunks.close()
    raise InputError(f"{', '.join(map(os.fspath, inputs))}: no record to decide the format from")


def preprocess_sft(
    inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike, tokenizer_path: str | os.PathLike, *,
    fmt: str = "auto", max_len: int | None = None, truncate: bool = False, skip_bad: bool = False,
    workers: int = 1, batch_size: int = 512, max_bad_shown: int = 5, progress: bool = True, overwrite: bool = False,
    separator: str | None = None,
) -> dict:
    """Tokenize instruction / chat / pair records into a loss-masked prefix (.bin/.idx/.mask/.json).

    Returns the summary: format, records, tokens, target_tokens, skipped_bad, skipped_empty, truncated,
    bad_examples, input_bytes, output_bytes, seconds. Raises InputError, BadInputError, TokenizerError,
    ChatTemplateError or OutputExistsError on bad input, leaving no output.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    started = time.perf_counter()
    output_prefix = os.fspath(output_prefix)
    fmt, decided_at = resolve_format(inputs, fmt, skip_bad=skip_bad)
    if separator is not None and fmt != "pair":
        raise InputError(f"--separator is for pair records; {', '.join(map(os.fspath, inputs))} holds {fmt} records")
    options = SftOptions(fmt, max_len, truncate, skip_bad, batch_size, max_bad_shown, separator)
    reader = _jsonl_reader(inputs, ReaderOptions(skip_bad=skip_bad, batch_size=batch_size, max_bad_shown=max_bad_shown))
    missing_dirs = check_output_prefix(output_prefix, reader, overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    encoder = SftEncoder(tokenizer, options, dtype)
    sft = {"format": fmt, "max_len": max_len, "truncate": truncate, "eod_is_target": fmt == "pair"}
    if encoder.template is not None:
        sft["template"] = encoder.template.describe()
    if fmt == "alpaca":
        sft["alpaca_join"] = ALPACA_JOIN
    if fmt == "pair":
        sft["pair_separator"] = {"text": encoder.separator, "id": encoder.sep_id}
    metadata = {**prefix_metadata(tokenizer, add_bos=False, append_eod=True, created_by="preprocess_sft"), "sft": sft}
    results = encoded_chunks(reader, encoder, tokenizer_path, workers)
    totals = write_encoded(output_prefix, reader, results, dtype=dtype, metadata=metadata, missing_dirs=missing_dirs,
                           progress=progress, desc="preprocess_sft", unit="records", started=started, loss_mask=True)
    stats = reader.stats
    return {"format": fmt, "format_decided_at": decided_at, "records": stats.documents, "tokens": totals["tokens"],
            "target_tokens": totals["target_tokens"], "skipped_bad": stats.skipped_bad,
            "skipped_empty": stats.skipped_empty, "truncated": totals["truncated"], "bad_examples": stats.bad_examples,
            "input_bytes": reader.total_bytes, "output_bytes": totals["output_bytes"],
            "seconds": time.perf_counter() - started}
