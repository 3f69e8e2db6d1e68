"""The work directory of a resumable LLM pipeline (EntiGraph, rephrase): a manifest and append-only record logs.

    with WorkDir.open(path, pipeline="entigraph", settings={...}) as wd:   # locks it; checks the manifest
        log = wd.log("relations.jsonl")
        for offset, record in log.load(): ...        # every finished request of earlier runs, torn tail dropped
        log.append({"key": ..., "ok": True, ...})    # one line, flushed and fsynced before it returns
        log.read_at(offset)                          # one record back, by the offset load() gave

Why this shape. A request is worth money, so a finished one must never be asked again: its record reaches
the disk (write + flush + fsync of one line) before the pipeline counts it as done, and a run killed at any
point resumes from the records. A kill can tear at most the line being written; load() drops such a tail
(and truncates it away, so the next append starts on a fresh line). A malformed line in the middle cannot come
from a kill and is reported as corruption (FILE:LINE), never skipped. The pipelines keep only keys and byte
offsets of relation records in memory and read the texts back by offset when they build the output, so memory
does not grow with the size of the synthetic corpus.

The manifest (manifest.json, written once, atomically) holds the settings that decide what the records
contain: input checksum, model, prompt hash, seed, sampling limits. A later run with different ones is refused
(WorkDirMismatch names the fields) instead of mixing two experiments in one directory; settings that only
change how the run goes (concurrency, budget, retries) are not in it. The directory is locked for the run
(megasynth.run_lock), so two processes never append to the same logs.

Request keys are JSON arrays (request_key): unambiguous whatever characters a document id or entity holds,
and deterministic, so a resumed run recognises its finished requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasynth.io import JsonlError, atomic_write_json, fsync_dir, remove_stale_temps, truncate_torn_tail
from megasynth.run_lock import acquire_run_lock

MANIFEST = "manifest.json"


class WorkDirMismatch(ValueError):
    """The work directory was made with other content-deciding settings; the message names them."""


def request_key(*parts: str | int) -> str:
    """The deterministic key of one request, e.g. request_key(doc_id, "pair", "Alice", "Bob")."""
    return json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))


class RecordLog:
    """One append-only JSONL file of finished requests (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._reader = None

    def load(self) -> Iterator[tuple[int, dict]]:
        """Yield (byte offset, record) for every complete line; a torn last line is truncated away first."""
        if not self.path.exists():
            return
        truncate_torn_tail(self.path)
        with open(self.path, "rb") as f:
            offset = 0
            for line_no, raw in enumerate(f, 1):
                yield offset, self._parse(raw, line_no)
                offset += len(raw)

    def _parse(self, raw: bytes, line_no: int) -> dict:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JsonlError(f"{self.path}:{line_no}: corrupt record ({e}); a killed run only ever tears the last "
                             "line, so this file was changed by something else") from None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise JsonlError(f"{self.path}:{line_no}: expected a record object with a string 'key'")
        return record

    def append(self, record: dict) -> int:
        """Write one record as one line, durably; return its byte offset."""
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        if self._file is None:
            new = not self.path.exists()
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for appends, closed by close()
            if new:
                fsync_dir(self.path.parent)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        return offset

    def read_at(self, offset: int) -> dict:
        if self._reader is None:
            self._reader = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self._reader.seek(offset)
        return self._parse(self._reader.readline(), -1)

    def close(self) -> None:
        for f in (self._file, self._reader):
            if f is not None:
                f.close()
        self._file = self._reader = None


@dataclass(frozen=True)
class Finished:
    """Where a finished request's record is, and how it ended (the record itself stays on disk)."""

    offset: int
    ok: bool
    error: str | None


def load_finished(log: RecordLog, keep: dict[str, dict] | None = None) -> dict[str, Finished]:
    """{key: Finished} over a log. A key may have several records (a failure, then a retry): an ok record wins,
    else the last one. With `keep`, the winning records themselves are also stored there by key."""
    out: dict[str, Finished] = {}
    for offset, record in log.load():
        key = record["key"]
        old = out.get(key)
        if old is not None and old.ok:
            continue
        ok = record.get("ok") is True
        out[key] = Finished(offset, ok, None if ok else str(record.get("error") or "unknown"))
        if keep is not None:
            keep[key] = record
    return out


class WorkDir:
    """A locked work directory with a checked manifest; use WorkDir.open(...) as a context manager."""

    def __init__(self, path: Path, lock, manifest: dict):
        self.path, self._lock, self.manifest = path, lock, manifest
        self._logs: list[RecordLog] = []

    @classmethod
    def open(cls, path: str | os.PathLike, *, pipeline: str, settings: dict[str, Any]) -> WorkDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise WorkDirMismatch(f"{path}: the work dir is not a directory")
        lock = acquire_run_lock(path)  # creates the directory
        try:
            remove_stale_temps(path)
            manifest = {"pipeline": pipeline, "settings": json.loads(json.dumps(settings))}
            mpath = path / MANIFEST
            if mpath.exists():
                try:
                    old = json.loads(mpath.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise WorkDirMismatch(f"{mpath}: unreadable manifest ({e})") from None
                _check_same(mpath, old, manifest)
            else:
                atomic_write_json(mpath, manifest)
        except BaseException:
            lock.release()
            raise
        return cls(path, lock, manifest)

    def log(self, name: str) -> RecordLog:
        log = RecordLog(self.path / name)
        self._logs.append(log)
        return log

    def close(self) -> None:
        for log in self._logs:
            log.close()
        self._lock.release()

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_same(mpath: Path, old: dict, new: dict) -> None:
    if old.get("pipeline") != new["pipeline"]:
        raise WorkDirMismatch(f"{mpath}: this work dir belongs to the {old.get('pipeline')!r} pipeline, not "
                              f"{new['pipeline']!r}; use another --work-dir")
    a, b = old.get("settings", {}), new["settings"]
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        shown = "; ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in differ[:4])
        raise WorkDirMismatch(f"{mpath}: the work dir was made with other settings ({shown}); its records would "
                              "not match this run. Use a new --work-dir, or the original settings")
