"""Read text documents from JSONL, Parquet and plain-text files: the input side of the preprocessing tools.

    reader = InputReader(["corpus/*.jsonl.zst"], ReaderOptions(json_key="text"))
    for text, location in reader:             # location: "corpus/a.jsonl.zst:17" (or "FILE:row 3" for Parquet)
        ...
    reader.stats, reader.sources              # counts, and [{"path", "bytes", "sha256"}] of the files read

Input kinds, chunks vs parsing, and bad input: docs/format.md ("Written by preprocessing").
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.data.streams import HashingRaw, open_hashed
from megasynth.io import file_sha256

FORMATS = ("jsonl", "parquet", "text")
TEXT_MODES = ("file", "line", "paragraph")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                  ".txt": "text", ".text": "text", ".md": "text", ".rst": "text"}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
KNOWN_INPUTS = "JSONL (.jsonl/.json/.ndjson), Parquet (.parquet) or text (.txt/.text/.md/.rst), optionally .gz/.zst"


class BadInputError(ValueError):
    """A record (or a whole file) that cannot be read as a document: `FILE:LINE: what is wrong`."""

    def __init__(self, location: str, problem: str):
        super().__init__(location, problem)  # both in args, so the error pickles across processes
        self.location = location
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}"


class InputError(ValueError):
    """An input path that names nothing readable (missing, no match, unknown format)."""


@dataclass(frozen=True)
class ReaderOptions:
    json_key: str = "text"  # JSONL: the key holding each document's text
    text_column: str = "text"  # Parquet: the column holding each document's text
    text_mode: str = "file"  # plain text: one document per file, per line, or per blank-line-separated paragraph
    input_format: str = "auto"  # "auto" (from the suffix) or one of FORMATS for every input
    skip_bad: bool = False  # count and skip bad records instead of raising BadInputError
    batch_size: int = 1024  # records per chunk (lines, rows; at least this many lines in paragraph mode)
    max_bad_shown: int = 5  # how many bad locations ReadStats keeps for the report

    def __post_init__(self):
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.input_format != "auto" and self.input_format not in FORMATS:
            raise ValueError(f"input_format must be 'auto' or one of {FORMATS}, got {self.input_format!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str  # one of FORMATS
    compression: str | None  # "gzip", "zstd" or None
    size: int  # bytes on disk


@dataclass
class Chunk:
    """Raw records of one file, as read by the main process; parse_chunk() turns them into texts."""

    file: str
    kind: str  # "jsonl", "line", "paragraph", "file" or "rows"
    first: int  # line number of the first record (1-based), or its row number for "rows" (0-based)
    payload: object  # bytes of whole lines; for "rows" a pyarrow string array
    done_bytes: int  # input bytes (as stored on disk) consumed over all files once this chunk was read


@dataclass
class Parsed:
    """The documents of one chunk and what was skipped; `positions` are lines (or rows) in `file`. Parsing fills
    it through add() and fail(): a bad record raises at once unless skip_bad."""

    file: str
    kind: str
    done_bytes: int
    skip_bad: bool = False
    texts: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    empty: int = 0
    bad: list[BadInputError] = field(default_factory=list)

    def locations(self) -> list[str]:
        return [_location(self.file, self.kind, p) for p in self.positions]

    def add(self, text: str, position: int) -> None:
        if not text or text.isspace():
            self.empty += 1
        else:
            self.texts.append(text)
            self.positions.append(position)

    def fail(self, position: int, problem: str) -> None:
        err = BadInputError(_location(self.file, self.kind, position), problem)
        if not self.skip_bad:
            raise err
        self.bad.append(err)


@dataclass
class ReadStats:
    documents: int = 0
    skipped_empty: int = 0
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # messages of the first few bad records
    max_examples: int = 5

    def record(self, parsed: Parsed) -> None:
        self.documents += len(parsed.positions)  # positions, not texts: a worker may drop the texts once encoded
        self.skipped_empty += parsed.empty
        self.skipped_bad += len(parsed.bad)
        room = self.max_examples - len(self.bad_examples)
        self.bad_examples.extend(str(e) for e in parsed.bad[: max(room, 0)])


def _location(file: str, kind: str, position: int) -> str:
    return f"{file}:row {position}" if kind == "rows" else f"{file}:{position}"


# -- finding the input files ------------------------------------------------------------------------------------
def detect_format(path: Path, input_format: str = "auto") -> tuple[str, str | None] | None:
    """(format, compression) of a file from its suffixes, or None when the suffix names no format we read."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSION.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = input_format if input_format != "auto" else (_SUFFIX_FORMAT.get(suffixes[-1]) if suffixes else None)
    if fmt is None or (fmt == "parquet" and compression):
        return None  # Parquet compresses inside the file; a compressed .parquet cannot be read by seeking
    return fmt, compression


def _files_under(root: Path, input_format: str) -> list[Path]:
    """The input files below a directory, sorted; hidden files and directories are skipped."""
    return sorted(p for p in root.rglob("*") if p.is_file() and detect_format(p, input_format) is not None
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def expand_inputs(inputs: Sequence[str | os.PathLike], input_format: str = "auto") -> list[InputFile]:
    """The files named by paths, directories and globs, in the order given (a directory's and a glob's sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for spec in inputs:
        spec = os.fspath(spec)
        path = Path(spec)
        if path.is_dir():
            files = _files_under(path, input_format)
            if not files:
                raise InputError(f"{spec}: directory holds no input files ({KNOWN_INPUTS})")
            found.extend(files)
        elif path.is_file():
            if detect_format(path, input_format) is None:
                raise InputError(f"{spec}: unknown input format: expected {KNOWN_INPUTS}, or pass --input-format")
            found.append(path)
        elif any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [p for p in matches if p.is_file() and detect_format(p, input_format) is not None]
            for d in (p for p in matches if p.is_dir()):
                files.extend(_files_under(d, input_format))
            if not files:
                raise InputError(f"{spec}: no input file matches this pattern ({KNOWN_INPUTS})")
            found.extend(files)
        else:
            raise InputError(f"{spec}: no such file or directory")
    unique: dict[Path, Path] = {}
    for p in found:  # a file named twice (a glob and its directory) is read once
        unique.setdefault(p.resolve(), p)
    return [InputFile(p, *detect_format(p, input_format), p.stat().st_size) for p in unique.values()]


# -- the reader ------------------------------------------------------------------------------------------------
class InputReader:
    """Documents from input files: iterate for `(text, location)`, or use chunks() + parse_chunk() + stats.record()."""

    def __init__(self, inputs: Sequence[str | os.PathLike], options: ReaderOptions | None = None):
        self.options = options or ReaderOptions()
        self.files = expand_inputs(inputs, self.options.input_format)
        self.total_bytes = sum(f.size for f in self.files)
        self.stats = ReadStats(max_examples=self.options.max_bad_shown)
        self.sources: list[dict] = []  # one entry per file fully read: {"path", "bytes", "sha256"}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for chunk in self.chunks():
            parsed = parse_chunk(chunk, self.options)
            self.stats.record(parsed)
            yield from zip(parsed.texts, parsed.locations())

    def chunks(self) -> Iterator[Chunk]:
        """Raw chunks of every file in order; a file's entry joins `sources` once its last chunk is out."""
        done = 0
        for file in self.files:
            if file.format == "parquet":
                yield from self._parquet_chunks(file, done)
                sha = file_sha256(file.path)
            else:
                try:
                    f = open(file.path, "rb", buffering=0)
                except OSError as e:
                    raise InputError(f"{file.path}: cannot read ({e.strerror})") from e
                raw, stream = open_hashed(f, file.compression)
                try:
                    yield from self._line_chunks(file, raw, stream, done)
                    raw.drain()
                finally:
                    stream.close()
                sha = raw.sha256.hexdigest()
            done += file.size
            self.sources.append({"path": str(file.path.resolve()), "bytes": file.size, "sha256": sha})

    def _line_chunks(self, file: InputFile, raw: HashingRaw, stream, done: int) -> Iterator[Chunk]:
        name = str(file.path)
        kind = "jsonl" if file.format == "jsonl" else self.options.text_mode
        line = 1
        n = self.options.batch_size
        try:
            if kind == "file":
                data = stream.read()
                yield Chunk(name, kind, 1, data, done + raw.count)
                return
            while True:
                lines = list(itertools.islice(stream, n))
                if kind == "paragraph" and len(lines) == n:
                    # End the chunk after a blank line so that no paragraph is split across two chunks.
                    while lines[-1].strip():
                        nxt = stream.readline()
                        if not nxt:
                            break
                        lines.append(nxt)
                if not lines:
                    return
                yield Chunk(name, kind, line, b"".join(lines), done + min(raw.count, file.size))
                line += len(lines)
        except (EOFError, OSError, zlib.error, ValueError) as e:  # gzip.BadGzipFile is an OSError
            # The failing read was somewhere in the chunk that starts at `line`.
            what = f"corrupt or truncated {file.compression} data" if file.compression else "read error"
            raise BadInputError(f"{name}:{line}", f"{what} at or after this line ({e})") from e

    def _parquet_chunks(self, file: InputFile, done: int) -> Iterator[Chunk]:
        import pyarrow as pa  # noqa: PLC0415
        import pyarrow.parquet as pq  # noqa: PLC0415

        name = str(file.path)
        column = self.options.text_column
        try:
            pf = pq.ParquetFile(file.path)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(name, f"not a readable Parquet file ({e})") from e
        schema = pf.schema_arrow
        if column not in schema.names:
            raise BadInputError(name, f"no column {column!r} (columns: {', '.join(schema.names)}); see --text-column")
        col_type = schema.field(column).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise BadInputError(name, f"column {column!r} has type {col_type}, expected string")
        total = max(pf.metadata.num_rows, 1)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=self.options.batch_size, columns=[column]):
                array = batch.column(0)
                # Parquet is read by row group, not by byte offset: progress is the share of rows read.
                yield Chunk(name, "rows", row, array, done + file.size * (row + len(array)) // total)
                row += len(array)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(f"{name}:row {row}", f"cannot read Parquet data ({e})") from e


# -- parsing a chunk ------------------------------------------------------------------------------------------------
def _json_type(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _decoded_lines(chunk: Chunk, out: Parsed) -> Iterator[tuple[int, str | None]]:
    """(line number, text without its newline) of each line; a line that is not UTF-8 goes to out.fail() and
    comes out as None (so that paragraph mode can drop the paragraph it belongs to)."""
    data: bytes = chunk.payload
    if data.endswith(b"\n"):
        data = data[:-1]
    try:
        pairs = enumerate(data.decode("utf-8").split("\n"), chunk.first)  # fast path: the whole chunk at once
    except UnicodeDecodeError:
        pairs = _decode_each(data.split(b"\n"), chunk.first, out)
    for number, line in pairs:
        if number == 1 and line and line.startswith("\ufeff"):
            line = line[1:]  # a byte-order mark opens some UTF-8 files; it is not text
        yield number, line


def _decode_each(raw_lines: list[bytes], first: int, out: Parsed) -> Iterator[tuple[int, str | None]]:
    for number, raw in enumerate(raw_lines, first):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.fail(number, f"invalid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
            text = None
        yield number, text


def lone_surrogate(line: str, texts) -> int | None:
    """The code point of the first lone surrogate in `texts` (JSON escapes can spell them, and they are not text),
    or None; `line`, the raw JSON they were parsed from, must hold a \\ud escape for any of them to hold one."""
    if "\\ud" in line or "\\uD" in line:
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return ord(text[e.start])
    return None


def _json_objects(chunk: Chunk, out: Parsed) -> Iterator[tuple[int, str, dict]]:
    """(line number, line, object) of each JSON-object line; blank lines are counted, bad ones go to out.fail()."""
    # Not megasynth.io.read_jsonl: that reads a whole file and stops at the first bad line, while this parses a
    # chunk of raw (often decompressed) bytes in a worker, numbers lines from the chunk's first line, and with
    # skip_bad counts a bad line and goes on; sharing it would cost a second decode in the hot loop.
    loads = json.loads
    for number, line in _decoded_lines(chunk, out):
        if line is None:
            continue
        if not line or line.isspace():
            out.empty += 1
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as e:
            out.fail(number, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        if type(obj) is not dict:
            out.fail(number, f"expected a JSON object, got {_json_type(obj)}")
            continue
        yield number, line, obj


class RecordProblem(ValueError):
    """Raised by a parse_json_chunk converter: what is wrong with one record (the reader adds FILE:LINE)."""


def parse_json_chunk(chunk: Chunk, convert, skip_bad: bool) -> tuple[Parsed, list]:
    """A JSONL chunk's objects, each through convert(obj, line) -> value (RecordProblem for a bad record),
    checked in line order like parse_chunk; returns (Parsed without texts, the values of the kept records).
    For readers of structured records (megasynth.data.sft) that need more than one text field."""
    if chunk.kind != "jsonl":
        raise BadInputError(chunk.file, "expected JSONL input (.jsonl/.json/.ndjson, optionally .gz/.zst)")
    out = Parsed(chunk.file, chunk.kind, chunk.done_bytes, skip_bad)
    values = []
    for number, line, obj in _json_objects(chunk, out):
        try:
            value = convert(obj, line)
        except RecordProblem as e:
            out.fail(number, str(e))
            continue
        values.append(value)
        out.positions.append(number)
    return out, values


def _parse_jsonl(chunk: Chunk, key: str, out: Parsed) -> None:
    for number, line, obj in _json_objects(chunk, out):
        try:
            text = obj[key]
        except KeyError:
            keys = ", ".join(map(repr, list(obj)[:10])) or "none"
            out.fail(number, f"no key {key!r} (keys: {keys}); see --json-key")
            continue
        if type(text) is not str:
            out.fail(number, f"{key!r} is {_json_type(text)}, expected a string")
            continue
        if (code := lone_surrogate(line, [text])) is not None:
            out.fail(number, f"{key!r} holds a lone surrogate escape (\\u{code:04x}), not text")
            continue
        out.add(text, number)


def _parse_paragraphs(chunk: Chunk, out: Parsed) -> None:
    start, para, poisoned = 0, [], False
    for number, line in _decoded_lines(chunk, out):
        if line is None or line.strip():
            if not para and not poisoned:
                start = number
            if line is None:
                poisoned = True  # a paragraph with an unreadable line is skipped whole (counted at that line)
            else:
                para.append(line.removesuffix("\r"))
            continue
        if para and not poisoned:
            out.add("\n".join(para), start)
        para, poisoned = [], False
    if para and not poisoned:
        out.add("\n".join(para), start)


def _parse_file(chunk: Chunk, out: Parsed) -> None:
    data: bytes = chunk.payload
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        out.fail(line, f"invalid UTF-8: byte 0x{data[e.start]:02x} at column {column}")
        return
    out.add(text.removeprefix("\ufeff"), 1)


def _parse_rows(chunk: Chunk, out: Parsed) -> None:
    array = chunk.payload
    try:
        values = array.to_pylist()
    except UnicodeDecodeError:  # Arrow does not validate UTF-8 on read; find the bad rows one by one
        values = []
        for i in range(len(array)):
            try:
                values.append(array[i].as_py())
            except UnicodeDecodeError:
                values.append(UnicodeDecodeError)
    for row, value in enumerate(values, chunk.first):
        if value is None:
            out.fail(row, "null value, expected a string")
        elif value is UnicodeDecodeError:
            out.fail(row, "invalid UTF-8 in the string")
        else:
            out.add(value, row)


def parse_chunk(chunk: Chunk, options: ReaderOptions) -> Parsed:
    """Texts of a chunk's records; raises BadInputError on the first bad one unless options.skip_bad."""
    out = Parsed(chunk.file, chunk.kind, chunk.done_bytes, options.skip_bad)
    if chunk.kind == "jsonl":
        _parse_jsonl(chunk, options.json_key, out)
    elif chunk.kind == "line":
        for number, line in _decoded_lines(chunk, out):
            if line is not None:
                out.add(line.removesuffix("\r"), number)
    elif chunk.kind == "paragraph":
        _parse_paragraphs(chunk, out)
    elif chunk.kind == "file":
        _parse_file(chunk, out)
    elif chunk.kind == "rows":
        _parse_rows(chunk, out)
    else:
        raise ValueError(f"unknown chunk kind {chunk.kind!r}")
    return out
