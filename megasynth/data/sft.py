"""Instruction and pair records -> a loss-masked prefix: the library behind tools/preprocess_sft.py (issue 11).

    from megasynth.data.sft import preprocess_sft
    summary = preprocess_sft(["train.jsonl"], "data/sft", "tok/", fmt="auto", max_len=2048, workers=4)
    summary["records"], summary["tokens"], summary["target_tokens"], summary["truncated"]

Record formats (JSONL, one record a line; other keys are ignored):

    prompt_response  {"prompt", "response"}                  -> user: prompt, assistant: response
    alpaca           {"instruction", "input"?, "output"}      -> user: instruction, or instruction + "\\n\\n" + input
                                                                 when input is a non-empty string; assistant: output
    chat             {"messages": [{"role", "content"}, ...]} -> as given (roles system, user, assistant)
    pair             {"source", "target"}                     -> SBP pairs, no template (below)

The first three are conversations rendered with the chat template (megasynth.chat: the tokenizer's own, else the
built-in ChatML one); the targets (loss mask True) are every assistant turn's content and its end-of-turn token,
everything else is context. A pair is `source tokens, <|sep|>, target tokens, EOD` with the loss on the target and
the EOD: p(target document | source document), as SBP's synthesizer needs; <|sep|> (megasynth.chat.PAIR_SEPARATOR,
added by tools/train_tokenizer.py --chat-tokens) must be one token of the tokenizer, or `separator` names another
single-id token (a pretrained tokenizer's special or reserved token); the sidecar records its text and id. Every
record ends with the end-of-document id, so examples stay apart when a prefix is read as one stream; in a
conversation it is context.

Tokens (megasynth.data.sft_encode). With the built-in template and for pairs, each record is rendered and
tokenized as one text, the same call as pretraining data, and the targets are found in the ids (the special
tokens mark every turn); with a tokenizer's own jinja template the template's pieces are tokenized apart and the
tokens around each boundary are checked against tokenizing them jointly. Either way the context is exactly what
generate.py --chat feeds the model as its prompt and the targets are the answer as tokenized after it; a
record where no token boundary falls at the start of an answer (e.g. an answer opening with spaces that merge
with the template's newline) is refused, naming it. SentencePiece models with a dummy prefix work: a record opens
with its "\u2581" once, like any document.

Bad records (FILE:LINE, exit 2 and no output in the tool; counted and skipped with skip_bad): missing or
non-string fields, an empty prompt/instruction/source or an empty response/output/assistant turn/target, a
conversation with no assistant turn or an unknown role, a text holding one of the template's special tokens, the
EOD token or any other special token of the tokenizer (Tokenizer.special_texts: the template's markers are the
only special ids a record may hold; issue 19), and a record of more than max_len tokens. With truncate, such a
record keeps its first max_len - 1 tokens and ends with EOD as context (the text did not end there, so the EOD
is never a target); one left with no target token is bad; truncated records are counted.

The pipeline is megasynth.data.preprocess's (its reader, worker pool, output checks and atomic writer), so the
output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megasynth.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    check_not_empty,
    idx_path,
    mask_path,
    sidecar_path,
    smallest_token_dtype,
)
from megasynth.data.preprocess import (
    check_output_prefix,
    encoded_chunks,
    remove_created_dirs,
)
from megasynth.data.readers import (
    BadInputError,
    InputError,
    InputReader,
    ReaderOptions,
    parse_json_chunk,
)
from megasynth.data.sft_encode import EncodedChunk, SftEncoder
from megasynth.data.sft_records import (
    ALPACA_JOIN,
    FORMAT_KEYS,
    FORMATS,
    SftOptions,
    detect_format,
    record_messages,
)
from megasynth.tokenizer import load_tokenizer

__all__ = ["ALPACA_JOIN", "FORMATS", "FORMAT_KEYS", "EncodedChunk", "SftEncoder", "SftOptions", "detect_format",
           "preprocess_sft", "record_messages", "resolve_format"]

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
    metadata = {"tokenizer": tokenizer.identity(), "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "append_eod": True, "add_bos": False, "created_by": "preprocess_sft", "sft": sft}
    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess_sft",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    tokens_total = targets_total = truncated = 0
    results = encoded_chunks(reader, encoder, tokenizer_path, workers)
    try:
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetWriter(output_prefix, dtype, metadata=metadata, loss_mask=True) as writer:
            for out in results:
                reader.record(out.parsed)
                writer.add_flat(out.tokens, out.lengths, loss_mask=out.mask)
                tokens_total += int(out.tokens.size)
                targets_total += int(np.count_nonzero(out.mask))
                truncated += out.truncated
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{reader.stats.documents / elapsed:,.0f} records/s, "
                                    f"{tokens_total / elapsed:,.0f} tok/s", refresh=False)
                bar.update(out.parsed.done_bytes - bar.n)
            stats = reader.stats
            check_not_empty(output_prefix, writer.num_documents, allow_empty=False)
            writer.finalize(metadata={
                "sources": reader.sources,
                "stats": {"documents": stats.documents, "tokens": tokens_total, "target_tokens": targets_total,
                          "skipped_empty": stats.skipped_empty, "skipped_bad": stats.skipped_bad,
                          "truncated": truncated},
            })
    except BaseException:
        remove_created_dirs(missing_dirs)  # the writer has already removed its temp files
        raise
    finally:
        results.close()  # on an error: stop the workers now, not when the generator is garbage-collected
        bar.close()
    out_bytes = sum(p.stat().st_size for p in (bin_path(output_prefix), idx_path(output_prefix),
                                                mask_path(output_prefix), sidecar_path(output_prefix)))
    return {"format": fmt, "format_decided_at": decided_at, "records": stats.documents, "tokens": tokens_total,
            "target_tokens": targets_total, "skipped_bad": stats.skipped_bad, "skipped_empty": stats.skipped_empty,
            "truncated": truncated, "bad_examples": stats.bad_examples, "input_bytes": reader.total_bytes,
            "output_bytes": out_bytes, "seconds": time.perf_counter() - started}
