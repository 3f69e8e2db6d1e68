"""Ahead-of-time GPU checks (megasynth.kernels.aot via bench/kernel_resources.py): every Triton kernel, compiled
for sm_80 (A100) and sm_90 (H100) at the configs host code picks there, compiles and fits the architecture's shared
memory; and the check really fails a launch that does not fit. sm_89, which the attention kernels' config tables
also name, is compiled by `python bench/kernel_resources.py --quick` (and the full matrix without --quick), not
here: a third of the suite's compile time for an architecture no training cluster uses.

The compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for this process, and
@triton.jit decides interpreted-or-compiled at import). Skipped where the installed Triton lacks the nvidia
backend or its bundled ptxas / cuobjdump.

    pytest tests/kernels/test_kernel_resources.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from megasynth.kernels.aot import toolchain_problem

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "kernel_resources.py"
TOY_CASES = Path(__file__).with_name("aot_toy_cases.py")

pytestmark = pytest.mark.skipif(toolchain_problem() is not None, reason=f"no AOT toolchain: {toolchain_problem()}")


def run_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *args],
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


def test_every_kernel_compiles_and_fits_on_sm80_and_sm90(tmp_path):
    # Two compile processes: the compiles are CPU-bound and this box has two cores.
    done, report = run_check(tmp_path, "--quick", "--arch", "80", "90", "--jobs", "2")
    detail = f"\n{done.stdout}\n{done.stderr[-3000:]}"
    assert report["failed_cases"] == [], detail
    bad = [r for r in report["rows"] if r["error"] or not r["fits"]]
    assert not bad, f"launches that would fail: {bad}{detail}"
    assert done.returncode == 0, detail

    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    expected = {
        "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
        "_ce_loss_grad_kernel", "_qknorm_rope_fwd_kernel", "_qknorm_rope_bwd_kernel",
        "_flash_attn_fwd_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel",
        "_flash_attn_bwd_dq_convert_kernel",
    }
    assert expected <= kernels, f"missing kernels: {expected - kernels}"
    for kernel in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == {80, 90}, kernel
    for r in rows:  # the numbers the table reports are real
        assert r["registers"] and 0 < r["registers"] <= 255 and r["shared_bytes"] <= r["limit"], r
    # The attention kernels at every (arch, head_dim): both dtypes, both layouts, causal and not; both backward
    # modes (dkdv with and without the atomic dQ; the dq kernel of the deterministic split, the convert kernel of
    # the single pass). Each mode's own kernels meet every dtype / layout / causal value across the head_dims.
    def attention_rows(kernel, arch, head_dim=None, atomic=None):
        return [r for r in rows if r["kernel"] == kernel and r["arch"] == arch
                and head_dim in (None, constexpr(r, "D")) and atomic in (None, constexpr(r, "ATOMIC_DQ"))]

    def assert_every_point(mine, what):
        assert {constexpr(r, "CAUSAL") for r in mine} == {"0", "1"}, what
        assert {constexpr(r, "IS_VARLEN") for r in mine} == {"0", "1"}, what
        assert {d for r in mine for d in r["dtypes"].split(",")} >= {"bf16", "fp16"}, what

    for arch in (80, 90):
        for head_dim in ("64", "128", "256"):
            for kernel in ("_flash_attn_fwd_kernel", "_flash_attn_bwd_dkdv_kernel"):
                assert_every_point(attention_rows(kernel, arch, head_dim), (kernel, arch, head_dim))
            dkdv = attention_rows("_flash_attn_bwd_dkdv_kernel", arch, head_dim)
            assert {constexpr(r, "ATOMIC_DQ") for r in dkdv} == {"0", "1"}, (arch, head_dim)
            for kernel in ("_flash_attn_bwd_dq_kernel", "_flash_attn_bwd_dq_convert_kernel"):
                assert attention_rows(kernel, arch, head_dim), (kernel, arch, head_dim)
        for kernel, atomic in (("_flash_attn_bwd_dkdv_kernel", "1"), ("_flash_attn_bwd_dkdv_kernel", "0"),
                               ("_flash_attn_bwd_dq_kernel", None)):
            assert_every_point(attention_rows(kernel, arch, atomic=atomic), (kernel, arch, atomic))
    for arch in (80, 90):
        for head_dim in ("64", "128", "256"):
            mine = [r for r in rows if r["kernel"] == "_qknorm_rope_fwd_kernel" and r["arch"] == arch
                    and constexpr(r, "HEAD_DIM") == head_dim]
            assert {d for r in mine for d in r["dtypes"].split(",")} >= {"bf16", "fp16"}, (arch, head_dim)


def test_oversized_launch_is_reported_and_fails_the_script(tmp_path):
    done, report = run_check(tmp_path, "--cases", str(TOY_CASES), "--jobs", "2")
    verdict = {(r["arch"], r["num_stages"]): r for r in report["rows"]}
    assert set(verdict) == {(80, 8), (86, 8), (80, 2), (86, 2)}, report
    for arch in (80, 86):
        big, small = verdict[(arch, 8)], verdict[(arch, 2)]
        assert not big["error"] and big["shared_bytes"] > big["limit"] and not big["fits"], big
        assert not small["error"] and small["shared_bytes"] <= small["limit"] and small["fits"], small
    assert done.returncode == 1, done.stdout + done.stderr
    assert "**NO**" in done.stdout and "WOULD FAIL" in done.stdout
