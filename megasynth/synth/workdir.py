"""The work directory of a resumable pipeline (EntiGraph, rephrase, embedding, synthesis): a manifest and logs.

    with WorkDir.open(path, pipeline="entigraph", settings={...}) as wd:   # locks it; checks the manifest
        log = wd.log("relations.jsonl")
        for offset, record in log.load(): ...        # every finished request of earlier runs, torn tail dropped
        log.append({"key": ..., "ok": True, ...})    # one line, flushed and fsynced before it returns
        done = load_finished(log)                    # {key: Finished}; done[key].pending(retry_failed)
        log.read_at(offset)                          # one record back, by the offset load() gave

Guarantees (durable records, torn lines, the manifest, the lock, request keys): docs/synth.md, "The work directory"."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megasynth.cli import directory, overlap_refusal
from megasynth.cli import prefix as prefix_spec
from megasynth.data.readers import InputError
from megasynth.io import JsonlError, atomic_write_json, fsync_dir, remove_stale_temps, truncate_torn_tail
from megasynth.run_lock import LOCK_NAME, acquire_path_lock, acquire_run_lock
from megasynth.work_units import describe_differences, setting_differences

MANIFEST = "manifest.json"


class WorkDirMismatch(ValueError):
    """The work directory was made with other content-deciding settings; the message names them."""


def request_key(*parts: str | int) -> str:
    """The deterministic key of one request, e.g. request_key(doc_id, "pair", "Alice", "Bob")."""
    return json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))


def derive_seed(*parts: str | int, bits: int = 31) -> int:
    """The one way a seed is derived from others (a run's seed and a request key, a document id, a sample): the low
    `bits` (at most 64) of sha256 over the parts joined by NUL. 31 by default: endpoints take int32 seeds."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


class RecordLog:
    """One durable append-only JSONL file of records with a "key": a pipeline's finished requests, the LLM ledger
    (guarantees: docs/synth.md, "The work directory")."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._reader = None
        self.torn = 0
        """Bytes of a torn last line that load() cut off."""

    def load(self) -> Iterator[tuple[int, dict]]:
        """Yield (byte offset, record) for every complete line; a torn last line is truncated away first."""
        if not self.path.exists():
            return
        self.torn = truncate_torn_tail(self.path)
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
        return self.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))

    def write(self, lines: bytes) -> int:
        """Append whole lines, written and fsynced before it returns; return the offset of the first. Unbuffered
        (os.write): after a failed write nothing stays buffered to land later, after the torn line load() cuts."""
        if self._fd is None:
            new = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # closed by close()
            if new:
                fsync_dir(self.path.parent)
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(lines)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
        return offset

    def read_at(self, offset: int) -> dict:
        if self._reader is None:
            self._reader = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self._reader.seek(offset)
        return self._parse(self._reader.readline(), -1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._reader is not None:
            self._reader.close()
        self._fd = self._reader = None


@dataclass(frozen=True)
class Finished:
    """Where a finished request's record is, and how it ended (the record itself stays on disk)."""

    offset: int
    ok: bool
    error: str | None
    transient: bool = False
    """A failure the endpoint caused (429, 5xx, timeout, connection): a plain rerun asks again."""

    def pending(self, retry_failed: bool) -> bool:
        """Whether a rerun asks for this item again: a transient failure always, a permanent one with
        retry_failed, a success never."""
        return not self.ok and (self.transient or retry_failed)


def finished_from(offset: int, record: dict) -> Finished:
    """The Finished of one record. A failure is transient as the record says; records written by older versions
    lack the field and are classified by their reason (megasynth.synth.llm.limits.is_transient)."""
    from megasynth.synth.llm.limits import is_transient  # noqa: PLC0415 - the llm ledger imports this module

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
    refusal = overlap_refusal({"output_prefix": prefix_spec(cfg.output_prefix), "work_dir": directory(cfg.work_dir)},
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
        then removed), so that two runs with different work dirs cannot both publish to it."""
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
            manifest = _manifest(pipeline, settings)
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
        _check_same(mpath, old, _manifest(pipeline, settings))
        if later is not None:
            _check_same(mpath, _manifest(pipeline, old.get("later", {})), _manifest(pipeline, later))

    def add_settings(self, more: dict[str, Any]) -> None:
        """Settings known only once the run has started (a loaded model's identity): checked against those an
        earlier run recorded (WorkDirMismatch), or recorded in the manifest's "later" if there are none yet. Call
        before writing any work, so that no work exists without them."""
        mpath, new = self.path / MANIFEST, _manifest(self.manifest["pipeline"], more)
        have = self.manifest.get("later")
        if have is not None:
            _check_same(mpath, _manifest(self.manifest["pipeline"], have), new)
            return
        self.manifest = {**self.manifest, "later": new["settings"]}
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


def _manifest(pipeline: str, settings: dict[str, Any]) -> dict:
    return {"pipeline": pipeline, "settings": json.loads(json.dumps(settings))}  # as JSON gives them back


def _read_manifest(mpath: Path) -> dict:
    try:
        old = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkDirMismatch(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(old, dict) or "pipeline" not in old or not isinstance(old.get("settings"), dict):
        raise WorkDirMismatch(f"{mpath}: not a manifest of this version (an older tool's, or another file); use "
                              f"another --work-dir, or delete {mpath.parent} to start over")
    return old


def _check_same(mpath: Path, old: dict, new: dict) -> None:
    if old.get("pipeline") != new["pipeline"]:
        raise WorkDirMismatch(f"{mpath}: this work dir belongs to the {old.get('pipeline')!r} pipeline, not "
                              f"{new['pipeline']!r}; use another --work-dir")
    differ = setting_differences(old.get("settings", {}), new["settings"])
    if differ:
        raise WorkDirMismatch(f"{mpath}: the work dir was made with other settings ({describe_differences(differ)}); "
                              "its records would not match this run. Use a new --work-dir, or the original settings")
