"""Ahead-of-time GPU checks without a GPU: compile every recorded Triton launch for sm_80 / sm_89 / sm_90 and measure
its registers, spills and shared memory against the architecture's limit (`run_check`; how: docs/kernels.md).

The command line (Markdown table, JSON report, exit status) is bench/kernel_resources.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import io
import multiprocessing
import os
import re
import resource
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import _launch
from ._launch import Launch


# -- the stub driver ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stub_driver(arch: int) -> Iterator[None]:
    """Make Triton compile for `GPUTarget("cuda", arch, 32)` inside the block; restores the previous driver."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 - triton only when compiling
    from triton.backends.driver import DriverBase  # noqa: PLC0415
    from triton.runtime import driver  # noqa: PLC0415

    target = GPUTarget("cuda", arch, 32)

    class StubDriver(DriverBase):
        """Answers the few questions Triton's JIT asks before compiling; launching is impossible."""

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            # JITFunction caches its binder (which holds the target) per device id: one id per architecture keeps
            # sm_80 and sm_90 compiles apart in one process.
            return target.arch

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise NotImplementedError("the AOT stub driver cannot run kernels")

        def map_python_to_cpp_type(self, ty):
            return ty

    previous = driver._active  # None until first use; reading .active would try to open a real GPU
    driver.set_active(StubDriver())
    try:
        yield
    finally:
        driver._active = previous


def toolchain_problem() -> str | None:
    """None when this Triton can compile for NVIDIA GPUs here; otherwise why not (for a clean skip)."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401, PLC0415
        from triton import knobs  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - any import failure means no nvidia backend
        return f"Triton's nvidia backend does not import: {e}"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
        except Exception as e:  # noqa: BLE001
            return f"Triton has no usable bundled {tool}: {e}"
        if not (path and os.access(path, os.X_OK)):
            return f"Triton's bundled {tool} is missing or not executable ({path})"
    return None


# -- cases and recording --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One configuration of one public Triton entry point: `run()` calls it forward and backward on CPU tensors."""

    kernel: str  # the public kernel family, e.g. "flash_attention"
    params: tuple[tuple[str, object], ...]  # e.g. (("dtype", "bf16"), ("head_dim", 128))
    run: Callable[[], None] = field(compare=False)
    archs: tuple[int, ...] = (80, 90)

    @property
    def name(self) -> str:
        return self.kernel + "[" + ",".join(f"{k}={v}" for k, v in self.params) + "]"


def record_launches(arch: int, case: Callable[[], None]) -> list[Launch]:
    """Run `case` with configs planned for `arch`; return the launches it would make (none of them run)."""
    with _launch.planning_for(arch) as launches:
        case()
    return list(launches)


def expand_variants(launch: Launch) -> list[tuple[object, tuple, dict]]:
    """-> [(jit_function, args, meta)]: one per config the launch can compile to (an Autotuner gives each of its
    configs that survive its early pruning; @triton.heuristics values are filled in)."""
    from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: PLC0415

    variants = [(launch.kernel, dict(launch.meta))]
    out = []
    while variants:
        kernel, meta = variants.pop(0)
        if isinstance(kernel, Heuristics):
            named = {**dict(zip(kernel.arg_names, launch.args)), **meta}
            variants.append((kernel.fn, {**meta, **{k: h(named) for k, h in kernel.values.items()}}))
        elif isinstance(kernel, Autotuner):
            configs = kernel.configs
            if kernel.early_config_prune:
                configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, launch.args)), **meta)
            variants.extend((kernel.fn, {**meta, **c.all_kwargs()}) for c in configs)
        else:
            out.append((kernel, launch.args, meta))
    return out


def _arg_signature(value) -> object:
    # What Triton specialises a non-constexpr argument on: a tensor's dtype and 16-byte alignment, an int's width
    # and whether it is 1 or a multiple of 16. Two launches that agree on these compile to the same binary.
    if isinstance(value, torch.Tensor):
        return (str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return ("int", -(2**31) <= value < 2**31, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


def describe(fn, args: tuple, meta: dict) -> tuple[dict, dict, tuple]:
    """-> (constexprs by name, compile options (num_warps, num_stages, ...), signature of the other arguments)."""
    names = [p.name for p in fn.params]
    bound = {**dict(zip(names, args)), **meta}
    constexpr = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
    options = {k: v for k, v in meta.items() if k not in names}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    signature = tuple(_arg_signature(bound.get(p.name)) for p in fn.params if not p.is_constexpr)
    return constexpr, options, signature


def launch_key(fn, args: tuple, meta: dict) -> tuple:
    """Launches with equal keys compile to the same binary: kernel, constexprs, options, argument signature."""
    constexpr, options, signature = describe(fn, args, meta)
    return (fn.__module__, fn.__name__, tuple(sorted(constexpr.items())), tuple(sorted(options.items())), signature)


# -- compiling ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One compiled kernel configuration and its resources on one architecture."""

    kernel: str
    arch: int
    config: str  # constexprs, short
    dtypes: str  # the tensor arguments' dtypes, e.g. "bf16,fp32"
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_bytes: int | None = None  # ptxas spill stores, or stack frame + local memory when ptxas did not run
    spill_detail: str = ""  # ptxas's "N B stores / M B loads" when known
    shared_bytes: int | None = None  # static + dynamic shared memory per block
    static_shared: int = 0  # the static part (cuobjdump SHARED; on sm_90 a 1 KiB reservation appears here)
    limit: int = 0
    fits: bool = False
    error: str = ""
    seconds: float = 0.0  # compile wall time (~0 when Triton's cache had it)
    cpu_seconds: float = 0.0  # compile CPU time, ptxas included (what 2 idle cores divide)
    cases: list[str] = field(default_factory=list)  # which cases recorded this launch
    group: str = ""  # launches from one Autotuner share a group: the launch fails only if no config fits

    @property
    def ok(self) -> bool:
        return not self.error and self.fits


def _run_tool(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout + done.stderr


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _resource_usage(compiled, arch: int, ptxas_log: str, exact_spills: bool) -> dict:
    """Registers, stack, local and static shared memory from `cuobjdump -res-usage`; exact spill stores/loads from
    `ptxas -v` when the kernel has a stack frame or local memory (where spills go): from the log of Triton's own
    ptxas run when it compiled just now, else (if exact_spills) from running ptxas again."""
    from triton import knobs  # noqa: PLC0415
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = _run_tool([knobs.nvidia.cuobjdump.path, "-res-usage", cubin])
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[-1]))
        usage = {k: int(v) for k, v in fields.items()}
        log = ptxas_log
        if not _SPILLS.search(log) and exact_spills and (usage.get("STACK", 0) or usage.get("LOCAL", 0)):
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = _run_tool([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                             f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", os.path.join(tmp, "k.o")])
    m = _SPILLS.search(log)
    usage["spill_detail"] = f"{m.group(1)} B stores / {m.group(2)} B loads" if m else ""
    usage["spill_stores"] = int(m.group(1)) if m else None
    return usage


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.bool: "bool"}


def _short(value) -> str:
    return str(value).replace("torch.", "") if not isinstance(value, bool) else str(int(value))


def _cpu_time() -> float:
    # This process and its finished children (ptxas runs as one).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_launch(variant: tuple[object, tuple, dict], arch: int, exact_spills: bool = True) -> Row:
    """Compile one (jit_function, args, meta) variant of a launch (expand_variants) for `arch` -> its resource Row.

    A compile error is reported in the row (error set, fits False), not raised. exact_spills=False skips the
    second ptxas run that a spilling kernel found in Triton's cache needs for its exact spill stores/loads."""
    fn, args, meta = variant
    constexpr, options, _ = describe(fn, args, meta)
    dtypes = sorted({_DTYPE_NAMES.get(a.dtype, str(a.dtype)) for a in args if isinstance(a, torch.Tensor)})
    row = Row(
        kernel=fn.__name__, arch=arch, config=" ".join(f"{k}={_short(v)}" for k, v in constexpr.items()),
        dtypes=",".join(dtypes),
        num_warps=options["num_warps"], num_stages=options["num_stages"], limit=_launch.max_shared_bytes(arch),
    )
    from triton import knobs  # noqa: PLC0415

    start, cpu_start = time.time(), _cpu_time()
    log = io.StringIO()
    try:
        # Triton prints its ptxas -v log when asked; capturing it saves a second ptxas run for the spill figures.
        with stub_driver(arch), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = fn.warmup(*args, grid=(1,), **meta)
        row.seconds, row.cpu_seconds = time.time() - start, _cpu_time() - cpu_start
        usage = _resource_usage(compiled, arch, log.getvalue(), exact_spills)
    except Exception as e:  # noqa: BLE001 - report the failure as the row's verdict
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return row
    row.registers = usage.get("REG")
    # ptxas's spill stores when known; else the stack frame + local memory, where spills go (an upper bound).
    stores = usage["spill_stores"]
    row.spill_bytes = stores if stores is not None else usage.get("STACK", 0) + usage.get("LOCAL", 0)
    row.spill_detail = usage["spill_detail"]
    # Triton's kernels take their shared memory as dynamic (metadata.shared); cuobjdump's SHARED is the static part.
    # Counting both against the opt-in limit is conservative (Triton itself checks only the dynamic part).
    row.static_shared = usage.get("SHARED", 0)
    row.shared_bytes = int(compiled.metadata.shared) + row.static_shared
    row.fits = row.shared_bytes <= row.limit
    return row


# -- the case table -------------------------------------------------------------------------------------------------
def load_cases(source: str | None, quick: bool) -> list[Case]:
    """The built-in table (megasynth.kernels._aot_cases) or `source`: a Python file or module with
    `cases(quick: bool) -> list[Case]` or a list `CASES`."""
    if source is None:
        from . import _aot_cases  # noqa: PLC0415

        return _aot_cases.cases(quick)
    if source.endswith(".py"):
        spec = importlib.util.spec_from_file_location("megasynth_aot_extra_cases", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    return module.cases(quick) if hasattr(module, "cases") else list(module.CASES)


# Worker processes re-create the case table and re-record a case rather than receive pickled kernels and tensors.
_WORKER_RECORDINGS: dict[tuple[str, int], list[Launch]] = {}
_WORKER_CASES: dict[str, Case] = {}


def quiet() -> None:
    # Triton 3.9 warns on every process that TRITON_DEFAULT_FP_FUSION is unset; its default (fusion on) is what a
    # GPU run compiles with, which is what this check must reproduce.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile_task(source: str | None, quick: bool, case_name: str, arch: int, launch_index: int, variant: int) -> Row:
    if not _WORKER_CASES:
        quiet()
        _WORKER_CASES.update((c.name, c) for c in load_cases(source, quick))
    key = (case_name, arch)
    if key not in _WORKER_RECORDINGS:
        _WORKER_RECORDINGS[key] = record_launches(arch, _WORKER_CASES[case_name].run)
    fn_args_meta = expand_variants(_WORKER_RECORDINGS[key][launch_index])[variant]
    return compile_launch(fn_args_meta, arch, exact_spills=not quick)


@dataclass
class Report:
    rows: list[Row]
    failed_cases: list[str]  # cases whose host code raised: "case @ sm_XX: error"
    seconds: float

    @property
    def ok(self) -> bool:
        """Every launch compiles and fits (an autotuned launch: at least one of its configs does)."""
        if self.failed_cases:
            return False
        groups: dict[str, bool] = {}
        for r in self.rows:
            if r.group:
                groups[r.group] = groups.get(r.group, False) or r.ok
            elif not r.ok:
                return False
        return all(groups.values())


def run_check(
    archs: list[int] | None = None, *, quick: bool = False, jobs: int = 1, source: str | None = None,
    kernels: list[str] | None = None, progress: Callable[[str], None] | None = None,
) -> Report:
    """Record every case for each architecture, merge identical launches, compile them (`jobs` processes)."""
    start = time.time()
    cases = [c for c in load_cases(source, quick) if not kernels or c.kernel in kernels]
    failed, tasks = [], {}
    for case in cases:
        for arch in case.archs if archs is None else archs:
            try:
                launches = record_launches(arch, case.run)
            except Exception as e:  # noqa: BLE001 - a host-code failure is a failed check, reported
                failed.append(f"{case.name} @ sm_{arch}: {type(e).__name__}: {e}")
                continue
            if not launches:
                failed.append(f"{case.name} @ sm_{arch}: recorded no launch (not a Triton entry point?)")
            for i, launch in enumerate(launches):
                variants = expand_variants(launch)
                group = f"{case.name}@{arch}#{i}" if len(variants) > 1 else ""
                for v, (fn, args, meta) in enumerate(variants):
                    key = (arch, launch_key(fn, args, meta))
                    task = tasks.setdefault(key, {"where": (case.name, arch, i, v), "cases": [], "group": group})
                    task["cases"].append(case.name)
    rows = _compile_all(list(tasks.values()), source, quick, jobs, progress)
    return Report(rows, failed, time.time() - start)


def _compile_all(tasks: list[dict], source, quick, jobs: int, progress) -> list[Row]:
    rows: list[Row] = []

    def done(task, row):
        row.cases, row.group = task["cases"], task["group"]
        rows.append(row)
        if progress:
            progress(f"[{len(rows)}/{len(tasks)}] sm_{row.arch} {row.kernel} {row.config}: "
                     + (row.error or f"{row.registers} regs, {row.shared_bytes} B shared"))

    if jobs <= 1:
        for task in tasks:
            done(task, _compile_task(source, quick, *task["where"]))
    else:
        # spawn, not fork: the parent has imported torch (its thread pools do not survive a fork).
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_task, source, quick, *t["where"]): t for t in tasks}
            for fut in cf.as_completed(futures):
                done(futures[fut], fut.result())
    rows.sort(key=lambda r: (r.kernel, r.arch, r.dtypes, r.config, r.num_warps, r.num_stages))
    return rows
