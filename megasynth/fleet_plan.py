"""GPU-hours, wall time and cost of a synthetic-data job on a fleet (tools/plan_fleet.py).

    rate = calibrated_rate("runs/calib.work")      # tokens/s of one worker, from a short run's unit records
    rows = fleet_plan(100e9, rate, gpus=[8, 64, 512], gpus_per_worker=1, usd_per_gpu_hour=2.0, overhead=0.1)

A worker makes `rate` tokens per second; `gpus_per_worker` GPUs serve one worker (a synthesizer split with tensor
parallelism); `overhead` is the share of time lost to restarts, stragglers and the publish step on top of the
pure generation time. Wall time on G GPUs is the total GPU time over G (independent workers scale linearly until
the shared filesystem or the endpoint is the bottleneck, which this does not model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class FleetPlanError(ValueError):
    """Bad calibration data or settings; the message names the file or flag."""


def calibrated_rate(work_dir: str | os.PathLike) -> tuple[float, int]:
    """(tokens per second of one worker, units measured) from the unit records of a run's work directory
    (megasynth.work_units: each records its counts and the seconds it took)."""
    records = sorted(Path(work_dir).glob("units/u*/DONE.json"))
    tokens = seconds = 0.0
    for path in records:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            counts = rec["counts"]
            tokens += float(counts.get("tokens", counts.get("completion_tokens", 0)))
            seconds += float(rec["seconds"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FleetPlanError(f"{path}: not a unit record with counts and seconds ({e})") from None
    if not records:
        raise FleetPlanError(f"{work_dir}: no published unit (units/u*/DONE.json) to calibrate from")
    if tokens <= 0 or seconds <= 0:
        raise FleetPlanError(f"{work_dir}: its {len(records)} units record no tokens or no time")
    return tokens / seconds, len(records)


@dataclass(frozen=True)
class FleetRow:
    gpus: int
    workers: int
    gpu_hours: float
    wall_hours: float
    usd: float


def fleet_plan(tokens: float, tokens_per_s: float, *, gpus: list[int], gpus_per_worker: int = 1,
               usd_per_gpu_hour: float = 0.0, overhead: float = 0.1) -> list[FleetRow]:
    if tokens <= 0 or tokens_per_s <= 0:
        raise FleetPlanError(f"need tokens > 0 and tokens/s > 0, got {tokens:g} and {tokens_per_s:g}")
    if gpus_per_worker < 1 or overhead < 0 or usd_per_gpu_hour < 0:
        raise FleetPlanError("need --gpus-per-worker >= 1, --overhead >= 0 and --usd-per-gpu-hour >= 0")
    worker_hours = tokens / tokens_per_s / 3600 * (1 + overhead)
    gpu_hours = worker_hours * gpus_per_worker
    rows = []
    for g in gpus:
        if g < gpus_per_worker:
            raise FleetPlanError(f"--gpus {g}: fewer than the {gpus_per_worker} GPUs one worker needs")
        workers = g // gpus_per_worker
        rows.append(FleetRow(g, workers, gpu_hours, worker_hours / workers, gpu_hours * usd_per_gpu_hour))
    return rows


def render(rows: list[FleetRow], tokens: float, tokens_per_s: float) -> str:
    from megasynth.mixture import format_count, render_table  # noqa: PLC0415

    head = (f"{format_count(tokens)} tokens at {tokens_per_s:,.0f} tokens/s per worker: "
            f"{_number(rows[0].gpu_hours)} GPU-hours")
    table = render_table(["GPUs", "workers", "wall time", "cost (US$)"],
                         [[str(r.gpus), str(r.workers), _duration(r.wall_hours), _number(r.usd)] for r in rows])
    return f"{head}\n{table}"


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _duration(hours: float) -> str:
    if hours * 60 < 1:
        return f"{hours * 3600:,.0f} s"
    if hours >= 48:
        return f"{hours / 24:,.1f} days"
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:,.1f} min"
