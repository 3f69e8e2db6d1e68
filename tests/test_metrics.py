"""Metrics: peak-FLOPs table, memory, metrics.jsonl writing and truncation (megasynth/metrics.py)."""

import json
import sys

import pytest
import torch

from megasynth.config import ConfigError, LogConfig
from megasynth.metrics import (
    MetricsLogger,
    ThroughputMeter,
    format_train_line,
    memory_gb,
    peak_flops,
    read_metrics,
    truncate_metrics,
)

TRAIN_KEYS = {"kind", "step", "loss", "grad_norm", "lr", "tokens", "flops", "tokens_per_s", "tflops", "mfu",
              "mem_gb", "time"}


def train_record(step, loss=2.0):
    return {"step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3, "tokens": 100 * step, "flops": 1e9 * step,
            "tokens_per_s": 1234.5, "tflops": 0.01, "mfu": None, "mem_gb": 0.3, "data_wait": 0.02}


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
    ("NVIDIA H100 80GB HBM3", "float32", None),  # the table holds bf16 peaks only
])
def test_peak_flops_by_device_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), dtype) == expected


def test_cpu_has_no_peak_and_reports_resident_memory():
    assert peak_flops(torch.device("cpu")) is None
    # Importing torch alone makes a process resident in tens of MiB; 100 GiB would mean a unit error.
    assert 0.01 < memory_gb(torch.device("cpu")) < 100


def test_throughput_meter():
    meter = ThroughputMeter()
    meter.add_step(tokens=1000, seconds=0.5, data_seconds=0.1)
    meter.add_step(tokens=1000, seconds=1.5, data_seconds=0.1)
    assert meter.summary() == pytest.approx((1000.0, 1.0, 0.1))
    meter.reset()
    assert meter.steps == 0 and meter.tokens == 0


def test_console_line():
    line = format_train_line({**train_record(7), "nonfinite": 0}, total_steps=20, eta_s=3725)
    for part in ("step 7/20", "loss 2.0000", "gnorm 0.500", "lr 1.00e-03", "1,234 tok/s", "MFU n/a", "data 2%",
                 "eta 1:02:05"):
        assert part in line
    assert "SKIPPED" in format_train_line({**train_record(7), "nonfinite": 2}, 20, 1.0)
    assert "MFU 41.0%" in format_train_line({**train_record(7), "mfu": 0.41}, 20, 1.0)


def test_logger_writes_every_key_and_survives_nan(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=10)
    logger.open(resume_step=None)
    logger.log_train(train_record(1))
    logger.log_train(train_record(2, loss=float("nan")))
    logger.log_eval({"step": 2, "tokens": 200, "flops": 2e9, "name": "valid", "loss": 1.5, "ppl": 4.48})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN is written as the string "nan"
    assert TRAIN_KEYS <= set(records[0]) and records[0]["kind"] == "train"
    assert records[1]["loss"] == "nan"
    assert {"kind", "step", "tokens", "flops", "name", "loss", "ppl"} <= set(records[2])
    assert "step 1/10" in capsys.readouterr().out


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "r1", rank=1)
    logger.open(resume_step=None)
    logger.log_train(train_record(1))
    assert not (tmp_path / "r1").exists() and capsys.readouterr().out == ""
    everyone = MetricsLogger(tmp_path / "r1", rank=1, log_cfg=LogConfig(all_ranks=True))
    everyone.info("hello")
    assert capsys.readouterr().out == "[rank 1] hello\n"


def test_resume_truncates_lines_past_the_step_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 7)) + '{"kind": "tr')
    logger = MetricsLogger(tmp_path)
    logger.open(resume_step=4)
    logger.log_train(train_record(5))
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(path, 100) == 0  # nothing to drop: the file is left alone
    fresh = MetricsLogger(tmp_path)
    fresh.open(resume_step=None)  # a fresh run starts a fresh file
    fresh.close()
    assert path.read_text() == ""


def test_missing_wandb_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees where it is not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLogger(tmp_path, log_cfg=LogConfig(wandb=True))
