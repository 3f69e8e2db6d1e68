"""The one home for durable file writes and line-numbered JSONL reading (docs/training.md, "Durable writes").

    atomic_write_text(path, "...")           # str; also atomic_write_json
    file_sha256(path)                        # the checksum sidecars and manifests record
    with atomic_open(path, "wb") as f: ...   # stream into a file that appears only on success
    with atomic_dir(final) as tmp: ...       # build a directory that appears only on success
    with atomic_files(out, names, commit="results.json", replace=True) as tmp: ...
                                             # a tool's result files in a directory it shares with others
    for line_no, obj in read_jsonl(path): ...  # JsonlError("FILE:LINE: ...") on bad input
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import time
import uuid
from glob import has_magic as glob_has_magic
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_TAG = ".tmp-"


class JsonlError(ValueError):
    """A JSONL line that is not valid JSON or not an object; the message starts with FILE:LINE."""


def temp_path_beside(path: str | os.PathLike, token: str | None = None) -> Path:
    """A hidden temp name in `path`'s directory: `.NAME.tmp-PID-HEX` (`token` replaces PID-HEX when given,
    so that several processes can agree on one name)."""
    path = Path(path)
    token = token or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return path.with_name(f".{path.name}{TEMP_TAG}{token}")


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_path_beside` (what a crashed write leaves behind)."""
    return name.startswith(".") and TEMP_TAG in name


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (a no-op where the OS refuses)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit fsync it and rename it to `path`, else delete it."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open: mode must be 'w', 'wt' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (UTF-8, not ASCII-escaped, indented by 2) with a trailing newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_open(dst, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (the one helper every sidecar and manifest checksum uses)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory by renaming it to a temp name first, so it never looks half-present."""
    path = Path(path)
    doomed = temp_path_beside(path, f"deleting-{uuid.uuid4().hex[:12]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `final`; on a clean exit fsync its files and rename it to `final`
    (an existing `final` is an error unless `replace`, which removes it just before the rename). On an
    exception the temp directory is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final}: already exists")
            remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def owned_names(names, entries) -> list[str]:
    """The entries (names in a directory) that `names` claims: each of `names` is a literal name or a glob
    pattern (`model-*-of-*.safetensors`: a count the tool does not know up front)."""
    return sorted(e for e in entries if any(fnmatch.fnmatchcase(e, n) for n in names))


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_dir(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names, *, commit: str, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `directory`; the caller writes some of `names` (the entries this tool
    owns there, `commit` among them; a name may be a glob pattern, and an entry a subdirectory, owned whole) into
    it. On a clean exit they are published like a prefix, `commit` last, leaving every other entry in `directory`
    alone (docs/training.md, "Durable writes"). Existing owned entries are an error (FileExistsError) unless
    `replace`. On an exception the temp directory is removed and `directory` is untouched."""
    directory = Path(directory)
    names = tuple(names)
    if os.path.lexists(directory) and not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a directory")
    if commit not in names or glob_has_magic(commit):
        raise ValueError(f"atomic_files: the commit file {commit!r} is not among the names {names}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(directory)
    tmp.mkdir()
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir())
        unknown = [n for n in written if n not in owned_names(names, written)]
        if unknown or commit not in written or (tmp / commit).is_dir():
            raise ValueError(f"atomic_files: wrote {written}; expected some of {names} with the file {commit!r}")
        _fsync_tree(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
            fsync_dir(directory.parent)
            return
        existing = owned_names(names, os.listdir(directory))
        if existing and not replace:
            raise FileExistsError(f"{directory}: already holds {', '.join(existing)}")
        (directory / commit).unlink(missing_ok=True)
        for name in existing:
            old = directory / name
            # os.replace puts a file over a file atomically, but not a directory over anything or anything over
            # a directory: those go first (no result set is visible now that `commit` is gone).
            if name not in written or (old.is_dir() and not old.is_symlink()) or (tmp / name).is_dir():
                _remove_entry(old)
        fsync_dir(directory)  # the old results are gone for good before any new file appears
        for name in written:
            if name != commit:
                os.replace(tmp / name, directory / name)
        fsync_dir(directory)
        os.replace(tmp / commit, directory / commit)
        fsync_dir(directory)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: str | os.PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Remove what crashed writes left in `directory` (files or directories with temp names); return them.
    Only entries not modified for `older_than_s` seconds are touched, so a live writer elsewhere is safe."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for entry in directory.iterdir():
        if not is_temp_name(entry.name):
            continue
        try:
            if now - entry.lstat().st_mtime < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(entry)
    return removed


def truncate_torn_tail(path: str | os.PathLike) -> int:
    """Cut an append-only line log back to its last newline (what a crash mid-append leaves after it is the only
    part that can be torn); returns the bytes removed. The file is scanned backwards in blocks, not read whole."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        pos, keep = size, 0
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def read_jsonl(path: str | os.PathLike, *, require_object: bool = True,
               text: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line number, parsed value) for each non-blank line of a JSONL file. A line that is not JSON
    (or not an object, with `require_object`) raises JsonlError naming FILE:LINE and what was expected. `text`
    parses that string instead of reading `path` (which then only names the source in errors)."""
    source = str(path)
    if text is not None:
        # Only "\n" ends a line: str.splitlines() would also split on U+2028 and the like, which JSON writers
        # (ensure_ascii=False) leave raw inside strings.
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        yield from _parse_lines(source, enumerate(lines, 1), require_object)
        return
    try:
        f = open(path, "rb")  # bytes, decoded per line, so a bad byte is reported on its own line
    except OSError as e:
        raise JsonlError(f"{source}: cannot read ({e.strerror or e})") from None
    with f:
        yield from _parse_lines(source, _decoded_lines(source, f), require_object)


def _decoded_lines(source: str, f) -> Iterator[tuple[int, str]]:
    for line_no, raw in enumerate(f, 1):
        try:
            yield line_no, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise JsonlError(f"{source}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _parse_lines(source: str, numbered_lines, require_object: bool) -> Iterator[tuple[int, Any]]:
    for line_no, line in numbered_lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JsonlError(f"{source}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if require_object and not isinstance(obj, dict):
            raise JsonlError(f"{source}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj
