"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for sm_80 / sm_89 / sm_90 on
a machine without a GPU (Triton's bundled ptxas and cuobjdump; see megasynth/kernels/aot.py for how).

    python bench/kernel_resources.py                 # the full matrix, Markdown table on stdout
    python bench/kernel_resources.py --quick         # the reduced (pairwise) matrix
    python bench/kernel_resources.py --arch 90 --kernels flash_attention --output table.md

Exits 1 if any launch would fail on its architecture (a compile error, or shared memory over
megasynth.kernels._launch.MAX_SHARED_BYTES), 2 if the installed Triton cannot compile for NVIDIA GPUs here.
Spilling kernels are marked in bold in the spills column. Runs without TRITON_INTERPRET (it re-executes itself
without it if set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from megasynth.kernels.aot import Report, Row, quiet, run_check, toolchain_problem


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| kernel | arch | dtypes | config | warps | stages | registers | spills | shared B | limit B | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtypes} | {r.config} | {r.num_warps} | {r.num_stages} | "
                         f"| | | {r.limit:,} | **compile error**: {r.error} |")
            continue
        spill = "0" if not r.spill_bytes else f"**{r.spill_detail or f'{r.spill_bytes} B stack/local'}**"
        fits = "yes" if r.fits else ("no (autotune skips it)" if r.group else "**NO**")
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtypes} | {r.config} | {r.num_warps} | {r.num_stages} | "
                     f"{r.registers} | {spill} | {r.shared_bytes:,} | {r.limit:,} | {fits} |")
    return "\n".join(lines)


def summary(report: Report) -> str:
    spilling = sum(1 for r in report.rows if r.spill_bytes)
    bad = [r for r in report.rows if not r.ok and not r.group]
    cpu = sum(r.cpu_seconds for r in report.rows)
    lines = [
        (f"{len(report.rows)} distinct launches compiled in {report.seconds:.1f} s ({cpu:.0f} CPU s compiling); "
         f"{len(bad)} would fail; {spilling} spill registers; {len(report.failed_cases)} cases failed.")
    ]
    lines += [f"FAILED: {s}" for s in report.failed_cases]
    lines += [f"WOULD FAIL: {r.kernel} sm_{r.arch} {r.config}: {r.error or f'{r.shared_bytes:,} B > {r.limit:,} B'}"
              for r in bad]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compile every Triton kernel ahead of time for NVIDIA architectures (no GPU needed) and print "
        "registers, spills and shared memory per launch as a Markdown table. Exits 1 if any launch would fail "
        "(compile error or shared memory over the limit), 2 if the toolchain is missing."
    )
    p.add_argument("--arch", type=int, nargs="+", default=None, metavar="CC",
                   help="compute capabilities to check, e.g. 80 86 90 (default: the archs each case lists: 80, 89, 90; "
                   "with --quick 80 and 90, plus 89 for the attention kernels)")
    p.add_argument("--quick", action="store_true",
                   help="the reduced matrix (pairwise over dtype / layout / causal) instead of "
                   "the full product; spills of kernels found in Triton's cache are then the stack frame's size, "
                   "not ptxas's exact figure (no second ptxas run)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile processes (compiles are CPU-bound; default: all cores)")
    p.add_argument("--kernels", nargs="+", default=None, metavar="NAME",
                   help="only these kernel families (rms_norm swiglu linear_cross_entropy qknorm_rope "
                   "flash_attention)")
    p.add_argument("--cases", default=None, metavar="FILE_OR_MODULE",
                   help="use the case table of this Python file / module (cases(quick) or CASES) instead of the "
                   "built-in one (the test suite passes its subset of the full table, and a deliberately oversized "
                   "kernel)")
    p.add_argument("--output", default=None, metavar="PATH", help="also write the Markdown report to PATH")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows and failed cases as JSON to PATH (what the tests read)")
    p.add_argument("--verbose", action="store_true", help="print each compile as it finishes (to stderr)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit reads TRITON_INTERPRET when a kernel module is imported; compiled cubins need it unset.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    quiet()
    problem = toolchain_problem()
    if problem:
        print(f"cannot compile ahead of time: {problem}", file=sys.stderr)
        return 2
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    report = run_check(args.arch, quick=args.quick, jobs=args.jobs, source=args.cases, kernels=args.kernels,
                       progress=log)
    text = markdown_table(report.rows) + "\n\n" + summary(report)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": report.ok, "seconds": report.seconds, "failed_cases": report.failed_cases,
                       "rows": [dataclasses.asdict(r) for r in report.rows]}, f, indent=1)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
