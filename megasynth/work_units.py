"""Independent workers over a fixed list of work units in a work directory on a shared filesystem (issue 21).

    units = WorkUnits(work_dir, stage="preprocess", settings=record, num_units=n)   # writes or checks the manifest
    report = run_worker(units, Worker.parse("1/3"), make_unit)    # make_unit(k, tmp_dir) -> counts, written there
    units.missing()                                               # [] once every unit is published
    for k in range(n): units.record(k), units.unit_dir(k)          # what publish assembles, in unit order

The work is `num_units` units known from the inputs and settings alone. Any number of workers, on any hosts, may run
at once; each does its own units (k % N == I for --worker I/N) first, then any other unit nobody holds, so a late or
extra worker helps and a dead worker's units are done by the survivors. A unit is made in a temp directory and
published by one rename, with its record (DONE.json: the settings' hash, its files' sizes and sha256, the counts)
inside: a unit directory exists whole or not at all, and a worker killed mid-unit leaves only a temp directory that
no one trusts (the next worker to take the unit removes it). While a worker makes a unit it holds the unit's lock
(flock on LOCKS/uNNNNNN.lock; the kernel, or on NFS the server after its lease time, drops it when the worker dies),
so no two live workers make the same unit and no unit is published twice. Every publication is also a line in the
worker's event log (events/), which is how tests count that no unit was made twice.

Why locks and not leases with an expiry of our own: a lease needs a heartbeat and a clock both hosts agree on; the
filesystem's lock manager already knows when its holder died (docs/cluster.md, "What survives what").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.faults import fault_point
from megasynth.io import atomic_dir, atomic_write_json, file_sha256, fsync_dir, is_temp_name, temp_path_beside
from megasynth.run_lock import RunDirBusy, acquire_path_lock

MANIFEST = "manifest.json"
RECORD = "DONE.json"
PUBLISHED = "published.json"
FAULT_ENV = "MEGASYNTH_FAULT_UNIT"  # tests: "stop:unit:K" / "unit:K" stops or kills a worker with unit K half made


class WorkUnitsError(ValueError):
    """A work directory of other settings, a damaged unit, or units still missing; the message names them."""


@dataclass(frozen=True)
class Worker:
    """Worker `index` of `count` (--worker I/N)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise WorkUnitsError(f"--worker {self.index}/{self.count}: expected I/N with 0 <= I < N")

    @classmethod
    def parse(cls, text: str, env: Mapping[str, str] | None = None) -> Worker:
        """`I/N`, or `auto`: a Slurm array task (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, from
        SLURM_ARRAY_TASK_MIN), else torchrun's RANK and WORLD_SIZE."""
        env = os.environ if env is None else env
        if text == "auto":
            if "SLURM_ARRAY_TASK_ID" in env:
                try:
                    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
                    return cls(task - int(env.get("SLURM_ARRAY_TASK_MIN", "0")), count)
                except (KeyError, ValueError):
                    raise WorkUnitsError("--worker auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT/MIN "
                                         "are missing or not integers (submit with sbatch --array=0-N)") from None
            if "RANK" in env and "WORLD_SIZE" in env:
                return cls(int(env["RANK"]), int(env["WORLD_SIZE"]))
            raise WorkUnitsError("--worker auto: neither a Slurm array task (SLURM_ARRAY_TASK_ID) nor torchrun "
                                 "(RANK, WORLD_SIZE) in the environment; pass --worker I/N")
        index, sep, count = text.partition("/")
        try:
            if not sep:
                raise ValueError
            numbers = int(index), int(count)
        except ValueError:
            raise WorkUnitsError(f"--worker {text!r}: expected I/N (worker I of N, from 0), e.g. 0/4, or auto") from None
        return cls(*numbers)

    def order(self, num_units: int) -> list[int]:
        """Own units first, then the others, starting after our own share so that helpers spread out."""
        own = list(range(self.index, num_units, self.count))
        others = [k for k in range(num_units) if k % self.count != self.index]
        shift = (len(others) * self.index) // self.count
        return own + others[shift:] + others[:shift]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def setting_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every setting that differs; nested dicts are compared key by key, so a refusal
    names e.g. input.max_tokens rather than the whole input record."""
    out = []
    for k in sorted(set(old) | set(new)):
        x, y = old.get(k), new.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += setting_differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def describe_differences(differ: list[tuple[str, object, object]], most: int = 4) -> str:
    """How a refusal of a work directory names what changed: `input.max_tokens: 128 then, 16 now; ...`."""
    return "; ".join(f"{k}: {x!r} then, {y!r} now" for k, x, y in differ[:most])


class WorkUnits:
    """The work directory of one stage's units: manifest.json, units/uNNNNNN/ (published), locks/, events/."""

    def __init__(self, path: str | os.PathLike, *, stage: str, settings: dict, num_units: int, create: bool = True):
        """`create=False` (a publish step): a work directory without a manifest is an error naming every unit as
        missing, and nothing is written."""
        if num_units < 1:
            raise WorkUnitsError(f"{path}: a stage needs at least one unit, got {num_units}")
        self.path, self.stage, self.num_units = Path(path), stage, num_units
        self.settings = json.loads(json.dumps(settings))  # as JSON gives it back
        self.settings_sha256 = settings_sha256(self.settings)
        if not create and not (self.path / MANIFEST).is_file():
            raise WorkUnitsError(f"{self.path}: no work directory (no {MANIFEST}): all {num_units} units are missing; "
                                 "run the workers first")
        self._write_or_check_manifest()

    # -- manifest ------------------------------------------------------------------------------------------------
    def _write_or_check_manifest(self) -> None:
        """The first worker writes it, by link() so that of two writers one wins whole; the others compare."""
        for sub in ("units", "locks", "events"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            tmp = temp_path_beside(mpath)
            atomic_write_json(tmp, {"stage": self.stage, "num_units": self.num_units,
                                    "settings_sha256": self.settings_sha256, "settings": self.settings})
            try:
                os.link(tmp, mpath)
                fsync_dir(self.path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise WorkUnitsError(f"{mpath}: unreadable manifest ({e})") from None
        if not isinstance(old, dict) or old.get("stage") != self.stage:
            raise WorkUnitsError(f"{mpath}: the work dir belongs to {old.get('stage') if isinstance(old, dict) else '?'!r}, "
                                 f"not the {self.stage!r} stage; use another --work-dir")
        if old.get("settings_sha256") != self.settings_sha256 or old.get("num_units") != self.num_units:
            differ = (setting_differences(old.get("settings", {}), self.settings)
                      or [("number of units", old.get("num_units"), self.num_units)])
            raise WorkUnitsError(f"{mpath}: the work dir was made with other settings ({describe_differences(differ)});"
                                 " its units would not belong to this run. Use the original settings, or another "
                                 "--work-dir")

    # -- units ---------------------------------------------------------------------------------------------------
    def unit_dir(self, k: int) -> Path:
        return self.path / "units" / f"u{k:06d}"

    def scratch_dir(self, k: int) -> Path:
        """A unit's own durable scratch space (e.g. an LLM method's log of finished requests), kept across kills
        and resumed by the next worker to take the unit (it holds the unit's lock meanwhile); removed once the unit
        is published. Only what a stage writes durably and checks on reading (megasynth.synth.workdir.RecordLog)
        belongs here: the unit itself is still made whole in its temp directory."""
        path = self.path / "scratch" / f"u{k:06d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, k: int) -> bool:
        return (self.unit_dir(k) / RECORD).is_file()

    def missing(self) -> list[int]:
        return [k for k in range(self.num_units) if not self.done(k)]

    def record(self, k: int, *, verify: bool = True) -> dict:
        """Unit k's record, checked: made with this manifest's settings, every file there with its size (and, with
        `verify`, its sha256). WorkUnitsError names the unit and what is wrong."""
        rpath = self.unit_dir(k) / RECORD
        try:
            rec = json.loads(rpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkUnitsError(f"{self.path}: unit {k} is not done") from None
        except (OSError, ValueError) as e:
            raise WorkUnitsError(f"{rpath}: unreadable unit record ({e}); remove {self.unit_dir(k)} and run a "
                                 "worker again") from None
        if rec.get("settings_sha256") != self.settings_sha256 or rec.get("unit") != k:
            raise WorkUnitsError(f"{rpath}: made with other settings or for another unit; remove {self.unit_dir(k)} "
                                 "and run a worker again")
        for name, want in rec.get("files", {}).items():
            path = self.unit_dir(k) / name
            if not path.is_file() or path.stat().st_size != want["bytes"] or (
                    verify and file_sha256(path) != want["sha256"]):
                raise WorkUnitsError(f"{path}: missing or not what unit {k}'s record says (size/sha256); remove "
                                     f"{self.unit_dir(k)} and run a worker again")
        return rec

    def refuse_missing(self) -> None:
        """WorkUnitsError listing the units not done yet (publish before completion)."""
        missing = self.missing()
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise WorkUnitsError(f"{self.path}: {len(missing)} of {self.num_units} units not done yet (units {shown}); "
                                 "run workers until they are (any number, any order), then publish")

    def published(self, output_file: str | os.PathLike | None = None) -> dict | None:
        """What the publish step recorded (its output and counts), or None before it ran, or once `output_file` (a
        file it wrote) is gone: then the output is to be published again."""
        if output_file is not None and not Path(output_file).is_file():
            return None
        try:
            return json.loads((self.path / PUBLISHED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def mark_published(self, output: str | os.PathLike, summary: dict) -> None:
        """After the output is in place: later workers of this work directory have nothing to do. The work
        directory stays (a worker started after its removal would make every unit again); remove it yourself."""
        atomic_write_json(self.path / PUBLISHED, {"output": os.path.abspath(output), "summary": summary})

    def _remove_temps(self, k: int) -> None:
        """What a worker killed while making unit k left (we hold k's lock: no live worker is making it)."""
        units = self.path / "units"
        for entry in units.iterdir():
            if is_temp_name(entry.name) and entry.name.startswith(f".u{k:06d}."):
                shutil.rmtree(entry, ignore_errors=True)


class UnitDeferred(Exception):
    """Raised by make_unit: this worker cannot finish unit `unit` now (a budget stop, failed items); it stays
    unpublished, its scratch directory kept for a later worker, and this worker goes on with the other units."""

    def __init__(self, unit: int, why: str):
        super().__init__(f"unit {unit}: {why}")
        self.unit, self.why = unit, why


@dataclass
class WorkerReport:
    made: list[int] = field(default_factory=list)
    """Units this worker made and published."""
    busy: list[int] = field(default_factory=list)
    """Units another live worker held when we came to them (not done when we looked)."""
    deferred: dict[int, UnitDeferred] = field(default_factory=dict)
    """Units make_unit deferred, with why."""


def run_worker(units: WorkUnits, worker: Worker, make_unit: Callable[[int, Path], dict], *,
               progress: Callable[[str], None] | None = None) -> WorkerReport:
    """Make and publish every unit not yet done that no live worker holds: own units first, then the rest.
    `make_unit(k, tmp)` writes the unit's files into the empty directory `tmp` and returns its counts (JSON), kept
    in the unit's record."""
    report = WorkerReport()
    events = units.path / "events" / f"{socket.gethostname()}.{os.getpid()}.jsonl"
    for k in worker.order(units.num_units):
        if units.done(k):
            continue
        try:
            lock = acquire_path_lock(units.path / "locks" / f"u{k:06d}", tool=f"a {units.stage} worker",
                                     flag="--work-dir")
        except RunDirBusy:
            report.busy.append(k)
            continue
        try:
            if units.done(k):  # published between our look and our lock
                continue
            units._remove_temps(k)
            t0 = time.monotonic()
            try:
                with atomic_dir(units.unit_dir(k)) as tmp:
                    counts = make_unit(k, tmp)
                    fault_point(FAULT_ENV, f"unit:{k}")
                    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
                    atomic_write_json(tmp / RECORD, {"unit": k, "settings_sha256": units.settings_sha256,
                                                     "files": files, "counts": counts, "worker": str(worker),
                                                     "host": socket.gethostname(), "pid": os.getpid(),
                                                     "seconds": round(time.monotonic() - t0, 3)})
            except UnitDeferred as e:
                report.deferred[k] = e
                continue
            shutil.rmtree(units.path / "scratch" / f"u{k:06d}", ignore_errors=True)
            with open(events, "a", encoding="utf-8") as log:
                log.write(json.dumps({"event": "published", "unit": k, "worker": str(worker)}) + "\n")
            report.made.append(k)
            if progress is not None:
                progress(f"unit {k} published ({len(report.made)} by this worker)")
        finally:
            lock.release(remove=False)  # the lock file stays: removing it could let two workers hold "the" lock
    return report


def make_then_check(units: WorkUnits, worker: Worker, make_unit, publish: str, out: dict, *, log=None) -> bool:
    """A stage's worker part: make units (not for publish="only"), noting in `out` what was made ("made", "busy");
    True when every unit is done and publishing is this call's to do (publish "auto" or "only"). For "only",
    WorkUnitsError names the missing units."""
    if publish not in ("auto", "never", "only"):
        raise ValueError(f"publish must be auto, never or only, got {publish!r}")
    if publish != "only":
        report = run_worker(units, worker, make_unit, progress=log)
        out["made"], out["busy"] = report.made, report.busy
        if publish == "never" or units.missing():
            return False
    units.refuse_missing()
    return True


@contextmanager
def publishing(units: WorkUnits, output: str | os.PathLike, output_file: str | os.PathLike, *, tool: str, flag: str,
               publish: str) -> Iterator[str]:
    """The publish step of a worker that found every unit done (make_then_check). Yields "publish" while this call
    holds the output's lock for its one publisher (the last workers may all find every unit done at once; released
    after): publish, then mark_published; "busy" when another process holds it and this call may leave publishing
    to it (for publish="only", RunDirBusy); "done" when another worker published while we looked
    (units.published(output_file); not for publish="only", which publishes again)."""
    try:
        lock = acquire_path_lock(output, tool=tool, flag=flag)
    except RunDirBusy:
        if publish == "only":
            raise
        lock = None
    if lock is None:  # not inside the except: the caller's errors must not chain to RunDirBusy
        yield "busy"
        return
    try:
        yield "done" if publish != "only" and units.published(output_file) is not None else "publish"
    finally:
        lock.release(remove=True)


def published_counts(events_dir: str | os.PathLike) -> dict[int, int]:
    """{unit: times published} over every worker's event log (each should be 1)."""
    out: dict[int, int] = {}
    for path in sorted(Path(events_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                k = json.loads(line)["unit"]
                out[k] = out.get(k, 0) + 1
    return out
