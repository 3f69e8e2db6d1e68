"""megasynth.data.readers: every input format, exact FILE:LINE locations, skip mode, streaming chunks, hashes."""

import gzip
import hashlib
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megasynth.data.readers import (
    BadInputError,
    InputError,
    InputReader,
    ReaderOptions,
    expand_inputs,
    parse_chunk,
)

DOCS = ["first document", "second,\nwith a newline", "ünïcödé 🎉", "x" * 5000, "last one"]


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def read(paths, **options):
    reader = InputReader(paths, ReaderOptions(**options))
    return list(reader), reader


@pytest.mark.parametrize("suffix, compress", [
    (".jsonl", lambda b: b),
    (".json", lambda b: b),
    (".jsonl.gz", gzip.compress),
    (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_plain_and_compressed(tmp_path, suffix, compress):
    data = compress(jsonl_bytes([{"text": d, "id": i} for i, d in enumerate(DOCS)]))
    path = tmp_path / f"a{suffix}"
    path.write_bytes(data)
    docs, reader = read([path], batch_size=2)
    assert docs == [(d, f"{path}:{i + 1}") for i, d in enumerate(DOCS)]
    assert reader.stats.documents == 5 and reader.stats.skipped_empty == reader.stats.skipped_bad == 0
    # The hash is of the file as stored (compressed), computed while reading.
    assert reader.sources == [{"path": str(path.resolve()), "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}]


def test_zstd_with_several_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(c.compress(jsonl_bytes([{"text": "a"}])) + c.compress(jsonl_bytes([{"text": "b"}])))
    assert [t for t, _ in read([path])[0]] == ["a", "b"]


@pytest.mark.parametrize("suffix, compress", [
    (".jsonl.gz", gzip.compress), (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_truncated_compressed_input_is_an_error(tmp_path, suffix, compress):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(compress(jsonl_bytes([{"text": f"document {i}"} for i in range(2000)]))[:-20])
    with pytest.raises(BadInputError, match=rf"{path}:\d+: corrupt or truncated"):
        read([path])


def test_parquet_rows_in_batches(tmp_path):
    path = tmp_path / "a.parquet"
    table = pa.table({"id": list(range(5)), "body": DOCS})
    pq.write_table(table, path, row_group_size=2)  # three row groups
    docs, reader = read([path], text_column="body", batch_size=2)
    assert docs == [(d, f"{path}:row {i}") for i, d in enumerate(DOCS)]
    assert reader.sources[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    chunks = list(InputReader([path], ReaderOptions(text_column="body", batch_size=2)).chunks())
    assert [len(c.payload) for c in chunks] == [2, 2, 1]
    assert chunks[-1].done_bytes == path.stat().st_size


def test_parquet_errors(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "", "d"]}), path)
    with pytest.raises(BadInputError, match=rf"^{path}:row 2: null value, expected a string$"):
        read([path])
    docs, reader = read([path], skip_bad=True)
    assert [d for d, _ in docs] == ["a", "b", "d"] and reader.stats.skipped_bad == 1 and reader.stats.skipped_empty == 1
    with pytest.raises(BadInputError, match=rf"^{path}: no column 'body' \(columns: text\); see --text-column$"):
        read([path], text_column="body")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(BadInputError, match=r"ints.parquet: column 'text' has type int64, expected string"):
        read([tmp_path / "ints.parquet"])
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadInputError, match=r"fake.parquet: not a readable Parquet file"):
        read([tmp_path / "fake.parquet"])


TEXT = b"\xef\xbb\xbfpara one\nstill one\n\n \t\npara two\r\nCRLF line\r\n\n\n\nlast para\nno final newline"


def test_text_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(TEXT)
    docs, reader = read([path], text_mode="file")
    # A whole file is one document, byte for byte (the byte-order mark is not text).
    assert docs == [(TEXT[3:].decode(), f"{path}:1")]
    docs, reader = read([path], text_mode="line")
    assert docs == [("para one", f"{path}:1"), ("still one", f"{path}:2"), ("para two", f"{path}:5"),
                    ("CRLF line", f"{path}:6"), ("last para", f"{path}:10"), ("no final newline", f"{path}:11")]
    assert reader.stats.skipped_empty == 5  # lines 3, 4 (whitespace only), 7, 8, 9
    expected = [("para one\nstill one", f"{path}:1"), ("para two\nCRLF line", f"{path}:5"),
                ("last para\nno final newline", f"{path}:10")]
    # Paragraphs never straddle chunks, whatever the chunk size.
    for batch_size in (1, 2, 3, 1024):
        docs, reader = read([path], text_mode="paragraph", batch_size=batch_size)
        assert docs == expected, batch_size
        assert reader.stats.skipped_empty == 0


def test_compressed_text_file(tmp_path):
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(TEXT))
    assert [t for t, _ in read([path], text_mode="line")[0]][:2] == ["para one", "still one"]


def test_invalid_utf8_in_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"good\nline \xff bad\n\nnext para\n")
    with pytest.raises(BadInputError, match=rf"^{path}:2: invalid UTF-8: byte 0xff at column 6$"):
        read([path], text_mode="line")
    with pytest.raises(BadInputError, match=rf"^{path}:2: invalid UTF-8: byte 0xff at column 6$"):
        read([path], text_mode="file")
    docs, reader = read([path], text_mode="paragraph", skip_bad=True)
    # The paragraph holding the bad line is skipped whole, not silently shortened.
    assert docs == [("next para", f"{path}:4")] and reader.stats.skipped_bad == 1
    docs, _ = read([path], text_mode="line", skip_bad=True)
    assert [t for t, _ in docs] == ["good", "next para"]


BAD_LINES = [
    ('{"text": "ok"}', None),
    ('{"text": "no closing brace"', "invalid JSON: Expecting ',' delimiter (column 28)"),
    ('{"body": "x", "id": 3}', "no key 'text' (keys: 'body', 'id'); see --json-key"),
    ('{"text": 12}', "'text' is a number, expected a string"),
    ('{"text": null}', "'text' is null, expected a string"),
    ('{"text": ["a"]}', "'text' is an array, expected a string"),
    ('["text"]', "expected a JSON object, got an array"),
    ('{"text": "lone \\ud800 surrogate"}', "'text' holds a lone surrogate escape (\\ud800), not text"),
    ('{"text": "pair \\ud83c\\udf89 is fine"}', None),
]


@pytest.mark.parametrize("line_no", [i for i, (_, problem) in enumerate(BAD_LINES, 1) if problem])
def test_each_bad_jsonl_line_names_file_and_line(tmp_path, line_no):
    line, problem = BAD_LINES[line_no - 1]
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n' * (line_no - 1) + line + "\n" + '{"text": "after"}\n')
    with pytest.raises(BadInputError) as e:
        read([path], batch_size=3)
    assert str(e.value) == f"{path}:{line_no}: {problem}"
    assert (e.value.location, e.value.problem) == (f"{path}:{line_no}", problem)


def test_invalid_utf8_in_jsonl(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInputError, match=rf"^{path}:2: invalid UTF-8: byte 0xe9 at column 14$"):
        read([path])


def test_skip_mode_counts_and_keeps_the_first_locations(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + '\n\n{"text": "   "}\n{"text": ""}\n')
    docs, reader = read([path], skip_bad=True, max_bad_shown=3, batch_size=4)
    assert [t for t, _ in docs] == ["ok", "pair 🎉 is fine"]
    assert [loc for _, loc in docs] == [f"{path}:1", f"{path}:9"]
    s = reader.stats
    assert (s.documents, s.skipped_bad, s.skipped_empty) == (2, 7, 3)  # blank line, whitespace, ""
    assert s.bad_examples == [f"{path}:{i}: {BAD_LINES[i - 1][1]}" for i in (2, 3, 4)]


def test_bad_input_error_survives_pickling():
    # Worker processes send it back to the main process.
    e = pickle.loads(pickle.dumps(BadInputError("f.jsonl:3", "invalid JSON")))
    assert str(e) == "f.jsonl:3: invalid JSON" and e.location == "f.jsonl:3"


def test_chunks_are_bounded_and_parse_anywhere(tmp_path):
    path = tmp_path / "a.jsonl"
    data = jsonl_bytes([{"text": f"doc {i}"} for i in range(10)])
    path.write_bytes(data)
    reader = InputReader([path], ReaderOptions(batch_size=3))
    chunks = list(reader.chunks())
    assert [c.first for c in chunks] == [1, 4, 7, 10]
    assert [c.payload.count(b"\n") for c in chunks] == [3, 3, 3, 1]
    assert chunks[-1].done_bytes == len(data)
    parsed = [pickle.loads(pickle.dumps(parse_chunk(pickle.loads(pickle.dumps(c)), reader.options))) for c in chunks]
    assert [t for p in parsed for t in p.texts] == [f"doc {i}" for i in range(10)]
    assert [loc for p in parsed for loc in p.locations()] == [f"{path}:{i}" for i in range(1, 11)]


def test_paths_directories_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/b.jsonl", "d/a.jsonl", "d/sub/c.jsonl.gz", "d/.hidden/h.jsonl", "d/.x.jsonl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d" / "notes.csv").write_text("a,b\n")  # unknown suffix: not an input in a directory
    names = lambda files: [f.path.relative_to(tmp_path).as_posix() for f in files]  # noqa: E731
    assert names(expand_inputs([tmp_path / "d"])) == ["d/a.jsonl", "d/b.jsonl", "d/sub/c.jsonl.gz"]
    assert names(expand_inputs([str(tmp_path / "d" / "*.jsonl")])) == ["d/a.jsonl", "d/b.jsonl"]
    assert names(expand_inputs([str(tmp_path / "d" / "**" / "*.gz")])) == ["d/sub/c.jsonl.gz"]
    # Order as given; a file named twice is read once.
    assert names(expand_inputs([tmp_path / "d" / "b.jsonl", tmp_path / "d"])) == \
        ["d/b.jsonl", "d/a.jsonl", "d/sub/c.jsonl.gz"]
    files = expand_inputs([tmp_path / "d" / "sub" / "c.jsonl.gz"])
    assert (files[0].format, files[0].compression) == ("jsonl", "gzip")
    assert expand_inputs([tmp_path / "d" / "notes.csv"], "text")[0].format == "text"
    with pytest.raises(InputError, match=r"missing.jsonl: no such file or directory"):
        expand_inputs([tmp_path / "missing.jsonl"])
    with pytest.raises(InputError, match=r"\*.parquet: no input file matches this pattern"):
        expand_inputs([str(tmp_path / "d" / "*.parquet")])
    with pytest.raises(InputError, match=r"notes.csv: unknown input format.*--input-format"):
        expand_inputs([tmp_path / "d" / "notes.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: directory holds no input files"):
        expand_inputs([tmp_path / "empty"])


def test_several_files_in_order_with_sources(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes([{"text": "a1"}, {"text": "a2"}]))
    (tmp_path / "b.txt").write_text("b file")
    docs, reader = read([tmp_path / "b.txt", tmp_path / "a.jsonl"])
    assert docs == [("b file", f"{tmp_path / 'b.txt'}:1"), ("a1", f"{tmp_path / 'a.jsonl'}:1"),
                    ("a2", f"{tmp_path / 'a.jsonl'}:2")]
    assert [s["path"] for s in reader.sources] == [str(tmp_path / "b.txt"), str(tmp_path / "a.jsonl")]
    assert reader.total_bytes == sum(s["bytes"] for s in reader.sources)


def test_options_are_checked():
    with pytest.raises(ValueError, match="text_mode"):
        ReaderOptions(text_mode="sentence")
    with pytest.raises(ValueError, match="input_format"):
        ReaderOptions(input_format="csv")
    with pytest.raises(ValueError, match="batch_size"):
        ReaderOptions(batch_size=0)
