"""megasynth.io: atomic writes leave the old file or the whole new one; JSONL errors name FILE:LINE."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megasynth.io import (
    JsonlError,
    atomic_dir,
    atomic_files,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    is_temp_name,
    read_jsonl,
    remove_stale_temps,
    temp_path_beside,
    truncate_torn_tail,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": "é"})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_killed_writer_leaves_old_file_and_a_removable_temp(tmp_path):
    """A SIGKILL in the middle of a write: the destination still holds the old bytes; the temp it left is
    recognised as one and removed by remove_stale_temps."""
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    script = textwrap.dedent(f"""
        import os, signal
        from megasynth.io import atomic_open
        with atomic_open({str(path)!r}, "w") as f:
            f.write("new" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert path.read_text() == "old\n"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "a.txt"]
    assert len(leftovers) == 1 and is_temp_name(leftovers[0].name)
    assert remove_stale_temps(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_remove_stale_temps_spares_recent_entries_and_normal_files(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    fresh = temp_path_beside(tmp_path / "b.txt")
    fresh.write_text("y")
    assert remove_stale_temps(tmp_path, older_than_s=3600) == []
    old = temp_path_beside(tmp_path / "c")
    old.mkdir()
    (old / "inner").write_text("z")
    past = os.path.getmtime(old) - 7200
    os.utime(old, (past, past))
    assert remove_stale_temps(tmp_path, older_than_s=3600) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep.txt", fresh.name])


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("1")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["a"]  # untouched
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_read_jsonl_line_numbers_and_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(JsonlError, match=rf"^{path}:2: not valid JSON \(Expecting value at column 7\)"):
        list(read_jsonl(path))
    # U+2028 inside a string is valid JSON on one line (json.dumps(ensure_ascii=False) writes it raw)
    text = json.dumps({"a": "x\u2028y"}, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    assert list(read_jsonl(path)) == list(read_jsonl("named", text=text)) == [(1, {"a": "x\u2028y"})]
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=rf"^{path}:2: expected a JSON object, got list"):
        list(read_jsonl(path))
    assert list(read_jsonl(path, require_object=False)) == [(1, {"a": 1}), (2, [1, 2])]
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JsonlError, match=rf"^{path}:2: not UTF-8"):
        list(read_jsonl(path))
    with pytest.raises(JsonlError, match="cannot read"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_truncate_torn_tail_keeps_every_complete_line(tmp_path):
    path = tmp_path / "log.jsonl"
    complete = b'{"a": 1}\n{"a": 2}\n'
    path.write_bytes(complete)
    assert truncate_torn_tail(path) == 0 and path.read_bytes() == complete
    torn = b'{"a": "' + b"x" * 200_000  # longer than one backward-scan block
    path.write_bytes(complete + torn)
    assert truncate_torn_tail(path) == len(torn) and path.read_bytes() == complete
    path.write_bytes(b'{"no newline at all')
    assert truncate_torn_tail(path) == 19 and path.read_bytes() == b""
    assert truncate_torn_tail(path) == 0


def test_atomic_files_replaces_only_its_own_files(tmp_path):
    names = ("data.jsonl", "extra.jsonl", "summary.json")
    out = tmp_path / "out"
    with atomic_files(out, names, commit="summary.json") as tmp:  # absent: the directory appears whole
        for name in names:
            (tmp / name).write_text(f"old {name}\n")
    (out / "mine.txt").write_text("the user's\n")
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already holds data.jsonl, extra.jsonl, summary.json"):
        with atomic_files(out, names, commit="summary.json") as tmp:
            (tmp / "summary.json").write_text("new\n")
    with pytest.raises(RuntimeError):  # a failed build leaves the old results and no temp directory
        with atomic_files(out, names, commit="summary.json", replace=True) as tmp:
            (tmp / "summary.json").write_text("new\n")
            raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_files(out, names, commit="summary.json", replace=True) as tmp:
        (tmp / "data.jsonl").write_text("new data\n")
        (tmp / "summary.json").write_text("new summary\n")
    # The new set, without the owned file this write did not produce; the user's file untouched.
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "data.jsonl": "new data\n", "summary.json": "new summary\n", "mine.txt": "the user's\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="expected some of"):
        with atomic_files(out, names, commit="summary.json", replace=True) as tmp:
            (tmp / "summary.json").write_text("x\n")
            (tmp / "mine.txt").write_text("a name the tool does not own\n")
    assert (out / "mine.txt").read_text() == "the user's\n"


def test_atomic_files_owns_patterns_and_subdirectories(tmp_path):
    names = ("index.json", "part-*.bin", "parts")  # a count known only when written; a subdirectory owned whole
    out = tmp_path / "out"
    with atomic_files(out, names, commit="index.json") as tmp:
        for i in range(3):
            (tmp / f"part-{i}.bin").write_bytes(b"old")
        (tmp / "parts").mkdir()
        (tmp / "parts" / "a.txt").write_text("old\n")
        (tmp / "index.json").write_text("{}\n")
    (out / "part.txt").write_text("the user's\n")  # matches no pattern
    with pytest.raises(FileExistsError, match="already holds index.json, part-0.bin, part-1.bin, part-2.bin, parts"):
        with atomic_files(out, names, commit="index.json") as tmp:
            (tmp / "index.json").write_text("new\n")
    with atomic_files(out, names, commit="index.json", replace=True) as tmp:
        (tmp / "part-0.bin").write_bytes(b"new")
        (tmp / "parts").mkdir()  # over the old directory: replaced, not merged
        (tmp / "parts" / "b.txt").write_text("new\n")
        (tmp / "index.json").write_text("new\n")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "index.json", "part-0.bin", "part.txt", "parts", "parts/b.txt"]
    assert (out / "part-0.bin").read_bytes() == b"new" and (out / "part.txt").read_text() == "the user's\n"
    with atomic_files(out, names, commit="index.json", replace=True) as tmp:  # none this time: the old one goes
        (tmp / "index.json").write_text("newer\n")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "part.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="commit file"):
        with atomic_files(out, names, commit="part-*.bin"):
            pass
