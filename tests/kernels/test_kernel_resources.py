"""Ahead-of-time GPU checks (megasynth.kernels.aot via bench/kernel_resources.py): a representative subset of the
compiles, and the check really fails a launch that does not fit.

The subset (tests/kernels/aot_suite_cases.py): every Triton kernel compiled once, at its largest config (the one
that can fail to fit), split between sm_80 (A100) and sm_90 (H100). The full matrix, every config for sm_80,
sm_89 and sm_90 (492 launches, minutes of compiling), is `python bench/kernel_resources.py`; `--quick` is the
pairwise one.

The compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this process, and
@triton.jit decides interpreted-or-compiled at import). Skipped where the installed Triton lacks the nvidia
backend or its bundled ptxas / cuobjdump.

    pytest tests/kernels/test_kernel_resources.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from megasynth.kernels.aot import toolchain_problem

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "kernel_resources.py"
SUITE_CASES = Path(__file__).with_name("aot_suite_cases.py")
TOY_CASES = Path(__file__).with_name("aot_toy_cases.py")

pytestmark = pytest.mark.skipif(toolchain_problem() is not None, reason=f"no AOT toolchain: {toolchain_problem()}")


def run_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    # --jobs 1: a worker process spends ~6 CPU s importing torch and Triton, more than the compiles it would take
    # over. --quick: no second ptxas run for exact spill figures when Triton's cache already has a kernel.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), "--jobs", "1", "--quick", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    if not out.exists():
        pytest.fail(f"kernel_resources.py wrote no report (rc {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done, json.loads(out.read_text())


def constexpr(row: dict, name: str) -> str | None:
    for part in row["config"].split():
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


def triton_entry_points() -> set[str]:
    """Every @triton.jit kernel (STYLE.md: `_name_kernel`; the other @triton.jit functions are device helpers)."""
    found = set()
    for path in (ROOT / "kernels").glob("*.py"):
        found.update(re.findall(r"^@triton\.jit\b.*\ndef (_\w+_kernel)\(", path.read_text(), flags=re.MULTILINE))
    return found


def test_every_kernel_compiles_and_fits_at_its_largest_config(tmp_path):
    done, report = run_check(tmp_path, "--cases", str(SUITE_CASES))
    detail = f"\n{done.stdout}\n{done.stderr[-3000:]}"
    assert report["failed_cases"] == [], detail
    bad = [r for r in report["rows"] if r["error"] or not r["fits"]]
    assert not bad, f"launches that would fail: {bad}{detail}"
    assert done.returncode == 0, detail

    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    expected = triton_entry_points()
    assert kernels == expected, f"kernels the suite does not compile (add a case to SUITE in {SUITE_CASES.name}): " \
                                f"{expected - kernels}; unknown: {kernels - expected}"
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:  # the numbers the table reports are real
        assert r["registers"] and 0 < r["registers"] <= 255 and 0 <= r["shared_bytes"] <= r["limit"], r
    # The two backward modes (dK/dV with and without the atomic dQ) and both values of each attention axis.
    attention = [r for r in rows if r["kernel"].startswith("_flash_attn_")]
    dkdv = [r for r in attention if r["kernel"] == "_flash_attn_bwd_dkdv_kernel"]
    assert {constexpr(r, "ATOMIC_DQ") for r in dkdv} == {"0", "1"}, dkdv
    for axis in ("CAUSAL", "IS_VARLEN"):
        assert {constexpr(r, axis) for r in dkdv} == {"0", "1"}, (axis, dkdv)
    assert {d for r in attention for d in r["dtypes"].split(",")} >= {"bf16", "fp16"}, attention


def test_oversized_launch_is_reported_and_fails_the_script(tmp_path):
    done, report = run_check(tmp_path, "--cases", str(TOY_CASES))
    assert report["failed_cases"] == [], report
    [row] = report["rows"]
    assert (row["kernel"], row["arch"]) == ("_toy_transpose_kernel", 80), row
    # The measured shared memory (the compiled kernel's, not an estimate) is over the limit, and that is the verdict.
    assert not row["error"] and row["registers"] and row["shared_bytes"] > row["limit"] and not row["fits"], row
    assert done.returncode == 1, done.stdout + done.stderr
    assert "**NO**" in done.stdout and "WOULD FAIL: _toy_transpose_kernel sm_80" in done.stdout, done.stdout
