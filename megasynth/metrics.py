"""Training metrics: throughput, FLOPs, MFU and memory; one console line per log step, metrics.jsonl, W&B.

    logger = MetricsLogger(run_dir, rank=0, log_cfg=cfg.log, total_steps=1000)
    meter = ThroughputMeter()
    ... meter.add_step(tokens, step_seconds, data_seconds) ...
    logger.log_train({"step": 10, "loss": 3.2, ...}, eta_s=...)
    logger.log_eval({"step": 10, "name": "valid", "loss": 3.1, ...})

The metrics.jsonl keys: docs/training.md ("Metrics").
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megasynth.config import ConfigError, LogConfig
from megasynth.io import atomic_write_text

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity). Matched as substrings
# of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
]


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device for `dtype` compute, or None when unknown (CPU, unlisted GPU, fp32 compute)."""
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device` (GiB), or the process's resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS (KiB on Linux, bytes on macOS)
        import resource  # noqa: PLC0415

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class ThroughputMeter:
    """Accumulates tokens and seconds between two log lines."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0

    def add_step(self, tokens: int, seconds: float, data_seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.data_seconds += data_seconds

    def summary(self) -> tuple[float, float, float]:
        """(tokens/s, seconds per step, share of the time spent waiting for data) since the last reset."""
        secs = max(self.seconds, 1e-9)
        return self.tokens / secs, self.seconds / max(1, self.steps), self.data_seconds / secs

    def reset(self) -> None:
        self.steps, self.tokens, self.seconds, self.data_seconds = 0, 0, 0.0, 0.0


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_train_line(rec: dict, total_steps: int, eta_s: float) -> str:
    """The console line of a training record (docs/training.md lists the keys)."""
    mfu = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.1f}%"
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"gnorm {rec['grad_norm']:.3f}",
        f"lr {rec['lr']:.2e}",
        *([f"{rec['targets']:,} targets"] if rec.get("targets") is not None else []),
        f"{rec['tokens_per_s']:,.0f} tok/s",
        f"{rec['tflops']:.3g} TFLOP/s",
        f"MFU {mfu}",
        f"mem {rec['mem_gb']:.2f} GiB",
        f"data {100 * rec.get('data_wait', 0.0):.0f}%",
        f"eta {format_duration(eta_s)}",
    ]
    if rec.get("nonfinite"):
        parts.append(f"SKIPPED non-finite ({rec['nonfinite']} in a row)")
    return " | ".join(parts)


def _json_safe(value):
    # JSON has no NaN/Infinity; a non-finite loss is logged as a string so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parsed(lines) -> Iterator[tuple[str, object]]:
    """(line, record) of each line that is JSON; a torn line (a killed writer) is skipped."""
    for line in lines:
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [record for _, record in _parsed(f)]


def truncate_metrics(path: str | os.PathLike, max_step: int) -> int:
    """Drop the records with step > max_step (and torn lines), rewriting atomically; returns lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line, rec in _parsed(lines) if isinstance(rec, dict) and rec.get("step", 0) <= max_step]
    if len(kept) == len(lines):
        return 0
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


class MetricsLogger:
    """Console lines (rank 0, or every rank prefixed with log.all_ranks), metrics.jsonl and optional W&B."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int = 0, log_cfg: LogConfig | None = None,
                 total_steps: int = 0, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.log_cfg = log_cfg or LogConfig()
        self.total_steps = total_steps
        self.is_main = rank == 0
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._wandb = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.log_cfg.wandb:
                self._wandb = _init_wandb(self.run_dir, self.log_cfg, config or {})

    def open(self, resume_step: int | None) -> None:
        """Open metrics.jsonl for appending; a resumed run first drops the lines past its step."""
        if not self.is_main:
            return
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old run directory starts a fresh file
        self._file = open(self.path, "a", encoding="utf-8")

    def info(self, message: str) -> None:
        """A console message from rank 0 (every rank, prefixed, with log.all_ranks)."""
        if self.log_cfg.all_ranks:
            print(f"[rank {self.rank}] {message}", flush=True)
        elif self.is_main:
            print(message, flush=True)

    def _write(self, rec: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _json_safe(v) for k, v in rec.items()}) + "\n")
            self._file.flush()
        if self._wandb is not None:
            prefix = "train" if rec["kind"] == "train" else f"eval/{rec['name']}"
            numbers = {f"{prefix}/{k}": v for k, v in rec.items()
                       if isinstance(v, (int, float)) and k not in ("step", "time")}  # W&B has its own clock
            self._wandb.log(numbers, step=rec["step"])

    def log_train(self, rec: dict, eta_s: float = float("nan")) -> None:
        rec = {"kind": "train", **rec, "time": time.time()}
        self._write(rec)
        self.info(format_train_line(rec, self.total_steps, eta_s))

    def log_eval(self, rec: dict) -> None:
        rec = {"kind": "eval", **rec, "time": time.time()}
        self._write(rec)
        self.info(f"eval {rec['name']} @ step {rec['step']}: loss {rec['loss']:.4f} | ppl {rec['ppl']:.2f}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(run_dir: Path, log_cfg: LogConfig, config: dict):
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise ConfigError("log.wandb=true but the wandb package is not installed: `pip install wandb`, "
                           "or set --log.wandb=false") from None
    # A stable id kept in the run directory lets a resumed run continue the same W&B run. We make it ourselves
    # (wandb.util.generate_id is not public API and is gone from current releases); W&B accepts any id of
    # letters, digits, '-' and '_'.
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=log_cfg.wandb_project, name=log_cfg.wandb_run_name or run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), mode=log_cfg.wandb_mode, config=config)
