"""The work directory of a resumable LLM pipeline (EntiGraph, rephrase): a manifest and append-only record logs.

    with WorkDir.open(path, pipeline="entigraph", settings={...}) as wd:   # locks it; checks the manifest
        log = wd.log("relations.jsonl")
        for offset, record in log.load(): ...        # every finished request of earlier runs, torn tail dropped
        log.append({"key": ..., "ok": True, ...})    # one line, flushed and fsynced before it returns
        done = load_finished(log)                    # {key: Finished}; done[key].pending(retry_failed)
        log.read_at(offset)                          # one record back, by the offset load() gave

Why this shape. A request is worth money, so a finished one must never be asked again: its record reaches
the disk (write + flush + fsync of one line) before the pipeline counts it as done, and a run killed at any
point resumes from the records. A kill can tear at most the line being written; load() drops such a tail
(and truncates it away, so the next append starts on a fresh line). A malformed line in the middle cannot come
from a kill and is reported as corruption (FILE:LINE), never skipped. The pipelines keep only keys and byte
offsets of relation records in memory and read the texts back by offset when they build the output, so memory
does not grow with the size of the synthetic corpus.

A failed request is recorded too, with its reason and "transient": whether the endpoint was at fault (429, 408,
5xx, timeout, dropped connection after the client's time budget) or the content (invalid JSON, empty reply,
another 4xx after max_attempts). Transient failures are not data loss (issue 19): a plain rerun asks for them
again (Finished.pending); permanent ones only with retry_failed.

The manifest (manifest.json, written once, atomically) holds the settings that decide what the records
contain: input checksum, model, prompt hash, seed, sampling limits. A later run with different ones is refused
(WorkDirMismatch names the fields) instead of mixing two experiments in one directory; settings that only
change how the run goes (concurrency, budget, retries) are not in it. The directory is locked for the run
(megasynth.run_lock), so two processes never append to the same logs; a second run is refused naming the
directory and the tool that holds it. The manifest is written (or checked) under the lock before the caller
writes anything, and a directory that holds files but no manifest is refused rather than adopted: its files
could come from any settings (issue 19). Settings known only once the run has started (an embedding model's
dimension) join the manifest through add_settings(), also before any work. Under torchrun one rank opens the
directory and the others check its manifest with WorkDir.check after a barrier, so ranks of one run never
lock each other out.

Request keys are JSON arrays (request_key): unambiguous whatever characters a document id or entity holds,
and deterministic, so a resumed run recognises its finished requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasynth.io import JsonlError, atomic_write_json, fsync_dir, remove_stale_temps, truncate_torn_tail
from megasynth.run_lock import LOCK_NAME, acquire_path_lock, acquire_run_lock
from megasynth.synth.llm.limits import is_transient

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
    transient: bool = False
    """A failure the endpoint caused (429, 5xx, timeout, connection): a plain rerun asks again (issue 19)."""

    def pending(self, retry_failed: bool) -> bool:
        """Whether a rerun asks for this item again: a transient failure always, a permanent one with
        retry_failed, a success never."""
        return not self.ok and (self.transient or retry_failed)


def finished_from(offset: int, record: dict) -> Finished:
    """The Finished of one record. A failure is transient as the record says; records written before issue 19
    lack the field and are classified by their reason (megasynth.synth.llm.limits.is_transient)."""
    ok = record.get("ok") is True
    error = None if ok else str(record.get("error") or "unknown")
    transient = not ok and record.get("transient", is_transient(error)) is True
    return Finished(offset, ok, error, transient)


def missing_items(failed: Iterable[tuple[str, Finished]]) -> dict:
    """What a run's output lacks, from its failed items as (step, Finished): {"transient": {step: {reason: count}},
    "permanent": {...}}, sorted, so that sidecars and messages are the same for the same failures."""
    out: dict[str, dict[str, dict[str, int]]] = {"transient": {}, "permanent": {}}
    for step, done in failed:
        reasons = out["transient" if done.transient else "permanent"].setdefault(step, {})
        reasons[done.error] = reasons.get(done.error, 0) + 1
    return {kind: {step: dict(sorted(r.items())) for step, r in sorted(steps.items())} for kind, steps in out.items()}


def refuse_overlapping_paths(cfg) -> None:
    """An LLM pipeline's output prefix and work dir may not be, hold or sit inside its inputs (megasynth.cli's
    rule, for library callers that bypass the tools): InputError naming the config fields."""
    from megasynth.cli import directory, overlap_refusal, prefix  # noqa: PLC0415
    from megasynth.data.readers import InputError  # noqa: PLC0415

    refusal = overlap_refusal({"output_prefix": prefix(cfg.output_prefix), "work_dir": directory(cfg.work_dir)},
                              {"input": cfg.input, "input_tokenizer": cfg.input_tokenizer, "tokenizer": cfg.tokenizer})
    if refusal:
        raise InputError(refusal)


def load_finished(log: RecordLog, keep: dict[str, dict] | None = None) -> dict[str, Finished]:
    """{key: Finished} over a log. A key may have several records (a failure, then a retry): an ok record wins,
    else the last one. With `keep`, the winning records themselves are also stored there by key."""
    out: dict[str, Finished] = {}
    for offset, record in log.load():
        key = record["key"]
        old = out.get(key)
        if old is not None and old.ok:
            continue
        out[key] = finished_from(offset, record)
        if keep is not None:
            keep[key] = record
    return out


class WorkDir:
    """A locked work directory with a checked manifest; use WorkDir.open(...) as a context manager."""

    def __init__(self, path: Path, lock, manifest: dict, created: bool = False, output_lock=None):
        self.path, self._lock, self.manifest, self._output_lock = path, lock, manifest, output_lock
        self.created = created
        """Whether this open wrote the manifest (a fresh directory), rather than resuming an earlier run's."""
        self._logs: list[RecordLog] = []

    @classmethod
    def open(cls, path: str | os.PathLike, *, pipeline: str, settings: dict[str, Any], tool: str | None = None,
             output: str | os.PathLike | None = None) -> WorkDir:
        """Lock PATH (RunDirBusy naming it and the holding `tool`, default tools/PIPELINE.py) and write or check
        its manifest. `output`: the prefix the run will publish, locked too until close() (OUT.lock beside it,
        then removed), so that two runs with different work dirs cannot both publish to it (issue 19)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise WorkDirMismatch(f"{path}: the work dir is not a directory")
        tool = tool or f"tools/{pipeline}.py"
        lock = acquire_run_lock(path, tool=tool)  # creates the directory
        output_lock = None
        try:
            if output is not None:
                output_lock = acquire_path_lock(output, tool=tool, flag="--output-prefix")
            remove_stale_temps(path)
            manifest = {"pipeline": pipeline, "settings": json.loads(json.dumps(settings))}
            mpath = path / MANIFEST
            created = not mpath.exists()
            if not created:
                old = _read_manifest(mpath)
                _check_same(mpath, old, manifest)
                manifest = old  # with what add_settings() recorded under "later"
            else:
                strays = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
                if strays:
                    raise WorkDirMismatch(
                        f"{path}: holds {', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''} but no {MANIFEST}, "
                        "so nothing says which settings made them; use another --work-dir, or delete it to start over")
                atomic_write_json(mpath, manifest)
        except BaseException:
            if output_lock is not None:
                output_lock.release(remove=True)
            lock.release()
            raise
        return cls(path, lock, manifest, created, output_lock)

    @staticmethod
    def check(path: str | os.PathLike, *, pipeline: str, settings: dict[str, Any],
              later: dict[str, Any] | None = None) -> None:
        """Check, without locking, that PATH's manifest holds these settings (and these add_settings() ones): a
        torchrun rank other than the one that opened the directory, after a barrier. WorkDirMismatch names what
        differs."""
        mpath = Path(path) / MANIFEST
        old = _read_manifest(mpath)
        _check_same(mpath, old, {"pipeline": pipeline, "settings": json.loads(json.dumps(settings))})
        if later is not None:
            _check_same(mpath, {"pipeline": pipeline, "settings": old.get("later", {})},
                        {"pipeline": pipeline, "settings": json.loads(json.dumps(later))})

    def add_settings(self, more: dict[str, Any]) -> None:
        """Settings known only once the run has started (a loaded model's identity): checked against those an
        earlier run recorded (WorkDirMismatch), or recorded in the manifest's "later" if there are none yet. Call
        before writing any work, so that no work exists without them."""
        more = json.loads(json.dumps(more))
        mpath = self.path / MANIFEST
        have = self.manifest.get("later")
        if have is not None:
            _check_same(mpath, {"pipeline": self.manifest["pipeline"], "settings": have},
                        {"pipeline": self.manifest["pipeline"], "settings": more})
            return
        self.manifest = {**self.manifest, "later": more}
        atomic_write_json(mpath, self.manifest)

    def log(self, name: str) -> RecordLog:
        log = RecordLog(self.path / name)
        self._logs.append(log)
        return log

    def close(self) -> None:
        for log in self._logs:
            log.close()
        if self._output_lock is not None:
            self._output_lock.release(remove=True)
        self._lock.release()

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_manifest(mpath: Path) -> dict:
    try:
        old = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkDirMismatch(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(old, dict) or "pipeline" not in old or not isinstance(old.get("settings"), dict):
        raise WorkDirMismatch(f"{mpath}: not a manifest of this version (an older tool's, or another file); use "
                              f"another --work-dir, or delete {mpath.parent} to start over")
    return old


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every setting that differs; nested dicts are compared key by key, so a
    refusal names e.g. input.max_tokens rather than the whole input record."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def _check_same(mpath: Path, old: dict, new: dict) -> None:
    if old.get("pipeline") != new["pipeline"]:
        raise WorkDirMismatch(f"{mpath}: this work dir belongs to the {old.get('pipeline')!r} pipeline, not "
                              f"{new['pipeline']!r}; use another --work-dir")
    differ = _differences(old.get("settings", {}), new["settings"])
    if differ:
        shown = "; ".join(f"{k}: {x!r} then, {y!r} now" for k, x, y in differ[:4])
        raise WorkDirMismatch(f"{mpath}: the work dir was made with other settings ({shown}); its records would "
                              "not match this run. Use a new --work-dir, or the original settings")
