"""Benchmark QK-norm + RoPE attention: ours (pre-pass + each attention core) against unfused PyTorch chains.

    python bench/attention.py                  # on a GPU: bf16, D 64 and 128, S 1k..16k at B*S = 16k tokens
    python bench/attention.py --quick          # the run bench/gpu_all.sh makes: S 1k, 4k, 16k; fwd and fwd+bwd
    python bench/attention.py --cpu-smoke      # one tiny fp32 config through the Triton interpreter (checks the
                                               # script; the numbers mean nothing)

Compared, each a function of (q, k, v, q_norm_weight, k_norm_weight, cos, sin) -> out [B, S, Hq, D]:
  ours <core>     qknorm_rope_attention(..., core=<core>): the fused QK-norm + RoPE pre-pass, then the core:
                  triton (our flash kernel), cudnn / flash (torch SDPA backends), flash_attn (the flash-attn
                  package, when installed); each only where kernels/attention_core.choose_core accepts it.
                  "ours triton+autotune" (--autotune) autotunes the Triton core's tiles per shape.
  unfused <x>     rms_norm_ref(q), rms_norm_ref(k) -> apply_rope_ref -> the attention x: SDPA flash, SDPA cuDNN,
                  flash-attn's flash_attn_func (when installed);
  unfused compiled  the same chain under torch.compile (Inductor fuses norm + RoPE; SDPA picks its backend);
A backend that cannot take GQA inputs gets k/v repeated to Hq heads ("kv expanded" in the table).

FLOPs: the forward counts 4 * B * Hq * S^2 * D, halved when causal; the backward 2.5x that, forward +
backward 3.5x. The ratio column divides the best of ours by the best unfused chain measured in the same run.
Times are triton.testing.do_bench medians (it clears the L2 between calls); calls rotate through several input
sets. Forward timings run with autograd recording, as in training. Before timing, every implementation's output
and dq are checked against the first one ("ours triton").

A second table times the pre-pass alone (qknorm_rope: forward, backward) in GB/s, counting each tensor read or
written once (forward: read q, k, write q_hat, k_hat; backward: read dq_hat, dk_hat, q, k, write dq, dk), as a
fraction of the device's copy bandwidth (a 1 GiB device-to-device copy, read + write), against the eager and
compiled unfused rms_norm_ref -> apply_rope_ref.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import sys
import time
from collections.abc import Callable

if "--cpu-smoke" in sys.argv[1:]:
    # Before torch is imported: torch imports triton.language, whose own @triton.jit helpers (tl.sum, ...) decide
    # interpreted-or-compiled when they are decorated; set later, our kernels would call compiled helpers.
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

# The public kernel modules import their @triton.jit files lazily (TRITON_INTERPRET is set above for the smoke run).
from megasynth.kernels import apply_rope_ref, qknorm_rope_attention, rms_norm_ref, rope_cos_sin
from megasynth.kernels.attention_core import available_backends, choose_core
from megasynth.kernels.qknorm_rope import qknorm_rope, qknorm_rope_ref
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

EPS = 1e-6
# Targets for D = 128 at S >= 4096 on an H100 (docs/benchmarks.md).
TARGET_SEQ, TARGET_FWD, TARGET_FWD_BWD, TARGET_PREPASS = 4096, 450.0, 350.0, 0.80
# bf16 chains round q_hat/k_hat, P and the output at 2^-8; two independent implementations differ by a few 1e-3.
AGREE_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DIRECTIONS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_COMPILED: dict[tuple[bool, bool], Callable] = {}


# ------------------------------------------------------------------------------------------------ implementations


def chain(q, k, v, q_w, k_w, cos, sin, *, causal: bool, expand_kv: bool, attend: str = "sdpa"):
    """The unfused chain: RMSNorm, RoPE, then SDPA (whatever backend the caller's context allows) or flash-attn."""
    q = apply_rope_ref(rms_norm_ref(q, q_w, EPS), cos, sin)
    k = apply_rope_ref(rms_norm_ref(k, k_w, EPS), cos, sin)
    if attend == "flash_attn":
        import flash_attn  # noqa: PLC0415 - optional

        return flash_attn.flash_attn_func(q, k, v, causal=causal)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    if expand_kv and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1 and not expand_kv)
    return out.transpose(1, 2)


def with_backend(fn: Callable, backend) -> Callable:
    def run(*args):
        with sdpa_kernel(backend):
            return fn(*args)

    return run


def our_cores(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The cores choose_core accepts for batched inputs of this dtype and head_dim here."""
    if device.type != "cuda":
        return ["triton"]
    cap = torch.cuda.get_device_capability(device)
    cores = []
    for core in ("triton", "cudnn", "flash", "flash_attn"):
        try:
            choose_core(core, device_type="cuda", capability=cap, dtype=dtype, head_dim=head_dim, varlen=False,
                        available=available_backends())
        except ValueError:
            continue
        cores.append(core)
    return cores


def build_impls(device, dtype, head_dim, causal, *, compile_chain, autotune):
    """name -> factory(expand_kv) -> fn(q, k, v, q_w, k_w, cos, sin). The first entry is the agreement baseline."""
    impls = {}
    for core in our_cores(device, dtype, head_dim):
        impls[f"ours {core}"] = (lambda c: lambda expand: lambda *a: qknorm_rope_attention(
            *a, causal=causal, eps=EPS, core=c))(core)
    if autotune and device.type == "cuda":
        from megasynth.kernels._flash_attn_triton import flash_attention_triton  # noqa: PLC0415

        def tuned(q, k, v, q_w, k_w, cos, sin):
            q_hat, k_hat = qknorm_rope(q, k, q_w, k_w, cos, sin, eps=EPS)
            return flash_attention_triton(q_hat, k_hat, v, causal=causal, autotune=True)

        impls["ours triton+autotune"] = lambda expand: tuned

    def chained(expand, attend="sdpa"):
        return lambda *a: chain(*a, causal=causal, expand_kv=expand, attend=attend)

    if device.type == "cuda":
        impls["unfused sdpa flash"] = lambda expand: with_backend(chained(expand), SDPBackend.FLASH_ATTENTION)
        impls["unfused sdpa cuDNN"] = lambda expand: with_backend(chained(expand), SDPBackend.CUDNN_ATTENTION)
        if "flash_attn" in available_backends():
            impls["unfused flash-attn"] = lambda expand: chained(expand, "flash_attn")
    else:
        impls["unfused sdpa (CPU default)"] = chained
    if compile_chain:
        def compiled_chain(expand):
            # One compiled function per variant for the whole run: torch.compile specialises on the first shape,
            # then recompiles once with dynamic shapes (its default), instead of a full compile per shape.
            key = (causal, expand)
            if key not in _COMPILED:
                _COMPILED[key] = torch.compile(chained(expand))
            return _COMPILED[key]

        impls["unfused compiled"] = compiled_chain
    return impls


# ------------------------------------------------------------------------------------------------ measuring


def make_input_sets(n_sets, batch, seq, heads, kv_heads, head_dim, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    cos, sin = rope_cos_sin(torch.arange(seq, device=device), head_dim)
    sets = []
    for _ in range(n_sets):
        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        leaves = (rand(batch, seq, heads, head_dim), rand(batch, seq, kv_heads, head_dim),
                  rand(batch, seq, kv_heads, head_dim), 1 + 0.1 * rand(head_dim), 1 + 0.1 * rand(head_dim))
        leaves = tuple(t.requires_grad_() for t in leaves)
        sets.append((leaves, (*leaves, cos, sin), rand(batch, seq, heads, head_dim)))
    return sets


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def milliseconds(fn: Callable[[], object], device: torch.device, rep: int) -> float:
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")
    fn()  # the interpreter: one warm-up, then one timed call (the smoke run checks the code path only)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_config(impls, sets, device, dtype, directions, rep) -> dict[str, dict]:
    """-> impl -> {direction: ms, "note": str}; NaN where an impl failed (note says why)."""
    results = {}
    ref_out = ref_dq = None
    for name, factory in impls.items():
        entry = {"note": ""}
        try:
            fn = factory(False)
            leaves, args, dout = sets[0]
            try:
                out = fn(*args)
            except RuntimeError:  # e.g. "No available kernel": this backend takes no GQA inputs
                if name.startswith("ours"):
                    raise
                fn, entry["note"] = factory(True), "kv expanded"
                out = fn(*args)
            dq = torch.autograd.grad(out, leaves[0], dout)[0]
            if ref_out is None:
                ref_out, ref_dq = out.detach(), dq
            else:
                errs = (rel_err(out, ref_out), rel_err(dq, ref_dq))
                if max(errs) > AGREE_RTOL[dtype]:
                    raise AssertionError(f"disagrees with the first: out {errs[0]:.1e}, dq {errs[1]:.1e}")
            del out, dq
            order = itertools.cycle(range(len(sets)))
            if "fwd" in directions:
                entry["fwd"] = milliseconds(lambda: fn(*sets[next(order)][1]), device, rep)
            if "bwd" in directions:
                outs = [fn(*s[1]) for s in sets]

                def backward():
                    i = next(order)
                    torch.autograd.grad(outs[i], sets[i][0], sets[i][2], retain_graph=True)

                entry["bwd"] = milliseconds(backward, device, rep)
                del outs

            def forward_backward():
                leaves, args, dout = sets[next(order)]
                torch.autograd.grad(fn(*args), leaves, dout)

            if "fwd+bwd" in directions:
                entry["fwd+bwd"] = milliseconds(forward_backward, device, rep)
        except (RuntimeError, ValueError, AssertionError, ImportError, torch.OutOfMemoryError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            entry = {d: math.nan for d in directions} | {"note": f"failed: {first[:80]}"}
            if ref_out is None:  # the baseline itself failed: nothing to compare against
                raise
        results[name] = entry
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def tflops(fwd_flops: float, direction: str, ms: float) -> float:
    return fwd_flops * DIRECTIONS[direction] / (ms * 1e-3) / 1e12


def _best(values: dict[str, float], prefix: str, exclude: str = "") -> tuple[str, float]:
    cands = [(n, x) for n, x in values.items() if n.startswith(prefix) and n != exclude and not math.isnan(x)]
    return max(cands, key=lambda nx: nx[1]) if cands else ("", math.nan)


def attention_table(rows, directions) -> list[str]:
    """rows: (head_dim, seq, batch, fwd_flops, results). One table per head_dim (the impls differ by D)."""
    lines = []
    for head_dim in dict.fromkeys(r[0] for r in rows):
        block = [r for r in rows if r[0] == head_dim]
        names = list(block[0][4])
        lines += ["", f"TFLOP/s at D = {head_dim}:", "",
                  "| S | B | pass | " + " | ".join(names) + " | best ours / best unfused |",
                  "|---:|---:|---|" + "---:|" * len(names) + "---:|"]
        for _, seq, batch, flops, results in block:
            for direction in directions:
                values = {n: tflops(flops, direction, results[n][direction]) for n in names}
                cells = []
                for n in names:
                    note = f" ({results[n]['note']})" if results[n]["note"] else ""
                    cells.append(f"{values[n]:.4g}{note}" if not math.isnan(values[n]) else f"n/a{note}")
                ours, best_ours = _best(values, "ours")
                _, best_unfused = _best(values, "unfused")
                ratio = f"{best_ours / best_unfused:.2f}x ({ours.removeprefix('ours ')})" \
                    if not math.isnan(best_ours) and not math.isnan(best_unfused) else "n/a"
                lines.append(f"| {seq} | {batch} | {direction} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def target_lines(rows) -> list[str]:
    lines = ["", f"Targets (H100/H200, D = 128, S >= {TARGET_SEQ}, causal): fwd >= {TARGET_FWD:.0f} TFLOP/s, "
                 f"fwd+bwd >= {TARGET_FWD_BWD:.0f} TFLOP/s, faster than every unfused chain (best of ours):"]
    checked = False
    for head_dim, seq, _, flops, results in rows:
        if head_dim != 128 or seq < TARGET_SEQ or "fwd" not in next(iter(results.values())):
            continue
        checked = True
        verdicts = []
        for direction, target in (("fwd", TARGET_FWD), ("fwd+bwd", TARGET_FWD_BWD)):
            values = {n: tflops(flops, direction, r[direction]) for n, r in results.items() if direction in r}
            name, ours = _best(values, "ours")
            _, unfused = _best(values, "unfused")
            ok = ours >= target and not ours < unfused
            verdicts.append(f"{direction} {ours:,.0f} ({name.removeprefix('ours ')}) vs unfused {unfused:,.0f} -> "
                            f"{'PASS' if ok else 'MISS'}")
        lines.append(f"- S = {seq}: " + "; ".join(verdicts))
    if not checked:
        lines.append("- no D = 128, S >= 4096 configuration in this run")
    return lines


def copy_bandwidth(device: torch.device, nbytes: int, rep: int) -> float:
    """Bytes per second moved by dst.copy_(src) (read + write) on a buffer of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (milliseconds(lambda: dst.copy_(src), device, rep) * 1e-3)


def prepass_table(args, device, dtype, rep) -> list[str]:
    """The pre-pass alone: ours vs the eager / compiled unfused chain, GB/s and fraction of copy bandwidth."""
    copy = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 20), rep)
    impls = {"ours": lambda *a: qknorm_rope(*a, eps=EPS), "eager": lambda *a: qknorm_rope_ref(*a, eps=EPS)}
    if not args.no_compile:
        impls["compiled"] = torch.compile(lambda *a: qknorm_rope_ref(*a, eps=EPS))
    lines = ["", f"QK-norm + RoPE pre-pass alone, {args.tokens} tokens, Hq = {args.heads}, Hkv = {args.kv_heads}; "
                 f"GB/s and fraction of copy bandwidth ({copy / 1e9:,.4g} GB/s):", "",
             "| D | pass | " + " | ".join(impls) + " | ours / best other |", "|---:|---|" + "---:|" * (len(impls) + 1)]
    seq = min(args.tokens, 4096)
    batch = max(1, args.tokens // seq)
    for head_dim in args.head_dims:
        gen = torch.Generator(device=device).manual_seed(1)
        q, k = (torch.randn(batch, seq, h, head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
                for h in (args.heads, args.kv_heads))
        w_q, w_k = (torch.ones(head_dim, device=device, dtype=dtype).requires_grad_() for _ in range(2))
        cos, sin = rope_cos_sin(torch.arange(seq, device=device), head_dim)
        qk_bytes = (q.numel() + k.numel()) * q.element_size()
        table_bytes = 2 * cos.numel() * cos.element_size()
        moved = {"fwd": 2 * qk_bytes + table_bytes, "bwd": 3 * qk_bytes + table_bytes}
        rates, outs, grads = {}, None, None
        for name, fn in impls.items():
            try:
                outs = fn(q, k, w_q, w_k, cos, sin)
                grads = tuple(torch.randn_like(o) for o in outs)
                fwd = milliseconds(lambda: fn(q, k, w_q, w_k, cos, sin), device, rep)
                bwd = milliseconds(lambda: torch.autograd.grad(outs, (q, k, w_q, w_k), grads, retain_graph=True),
                                   device, rep)
                rates[name] = {"fwd": moved["fwd"] / fwd / 1e6, "bwd": moved["bwd"] / bwd / 1e6}
            except (RuntimeError, ValueError) as exc:
                rates[name] = {"fwd": math.nan, "bwd": math.nan, "note": str(exc).splitlines()[0][:60]}
        for direction in ("fwd", "bwd"):
            cells = [f"{r[direction]:,.4g} ({r[direction] * 1e9 / copy:.0%})" if not math.isnan(r[direction])
                     else f"failed: {r['note']}" for r in rates.values()]
            others = [r[direction] for n, r in rates.items() if n != "ours" and not math.isnan(r[direction])]
            ratio = f"{rates['ours'][direction] / max(others):.2f}x" if others else "n/a"
            lines.append(f"| {head_dim} | {direction} | " + " | ".join(cells) + f" | {ratio} |")
        outs = grads = None  # free before the next head_dim
    lines.append(f"\nPre-pass target: >= {TARGET_PREPASS:.0%} of copy bandwidth.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="one tiny fp32 config on the CPU through the Triton interpreter (TRITON_INTERPRET=1); "
                             "checks that the script runs, the numbers mean nothing")
    parser.add_argument("--quick", action="store_true",
                        help="the bench/gpu_all.sh run: S 1024 4096 16384, fwd and fwd+bwd only, shorter timing")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dims (default 64 128)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths; the batch is --tokens // S (default 1024 .. 16384)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step, B * S (default 16384)")
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32, as Llama-3 8B)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8, GQA ratio 4)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="input dtype (default bf16)")
    parser.add_argument("--no-causal", action="store_true", help="full (non-causal) attention instead of causal")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile chains")
    parser.add_argument("--autotune", action="store_true",
                        help="also time 'ours triton+autotune' (the Triton core autotuned per shape; slower start)")
    parser.add_argument("--no-prepass", action="store_true", help="skip the pre-pass bandwidth table")
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated through while timing (default 3)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench milliseconds per measurement (default 100)")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        print(f"bench/attention.py: --heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}",
              file=sys.stderr)
        return 2
    directions = list(DIRECTIONS)
    if args.quick:  # the target rows (D = 128) first, so a run cut short by a timeout still has them
        args.seqs, args.rep, directions = [1024, 4096, 16384], min(args.rep, 40), ["fwd", "fwd+bwd"]
        args.head_dims = sorted(args.head_dims, reverse=True)

    if args.cpu_smoke:
        # Must be set before the kernel modules are imported: @triton.jit reads it when it decorates.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MEGASYNTH_KERNELS"] = "triton"  # the pre-pass too, through the interpreter
        device, dtype = torch.device("cpu"), torch.float32
        args.head_dims, args.seqs, args.tokens, args.heads, args.kv_heads = [32], [40], 40, 2, 1
        args.no_compile, args.sets = True, 2
    elif not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device, nothing to measure (run with --cpu-smoke to exercise the script)",
              file=sys.stderr)
        return 0
    else:
        device, dtype = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    causal = not args.no_causal
    configs = [(d, s) for d in args.head_dims for s in args.seqs if args.tokens // s >= 1]
    rows, stopped = [], False

    def stop(signum, frame):  # `timeout` sends SIGTERM: print the configurations already measured
        raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        for head_dim, seq in tqdm(configs, desc="bench/attention", file=sys.stderr):
            batch = args.tokens // seq
            impls = build_impls(device, dtype, head_dim, causal, compile_chain=not args.no_compile,
                                autotune=args.autotune)
            sets = make_input_sets(args.sets, batch, seq, args.heads, args.kv_heads, head_dim, dtype, device)
            flops = 4.0 * batch * args.heads * seq * seq * head_dim / (2 if causal else 1)
            rows.append((head_dim, seq, batch, flops,
                         bench_config(impls, sets, device, dtype, directions, args.rep)))
            del sets
    except _Stopped:
        stopped = True

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        auto = choose_core("auto", device_type="cuda", capability=torch.cuda.get_device_capability(device),
                           dtype=dtype, head_dim=128, varlen=False, available=available_backends())
        auto_varlen = choose_core("auto", device_type="cuda", capability=torch.cuda.get_device_capability(device),
                                  dtype=dtype, head_dim=128, varlen=True, available=available_backends())
        cores = f"; core='auto' picks {auto} (batched), {auto_varlen} (varlen) at D = 128"
    else:
        where, cores = "CPU, Triton interpreter (smoke)", ""
    print(f"\n### QK-norm + RoPE attention on {where}, {str(dtype).removeprefix('torch.')}, "
          f"{'causal' if causal else 'full'}, Hq = {args.heads}, Hkv = {args.kv_heads}, B * S = {args.tokens}, "
          f"torch {torch.__version__}{cores}")
    if rows:
        print("\n".join(attention_table(rows, directions)))
        print("\n".join(target_lines(rows)))
    if stopped:
        print(f"\n**Stopped (SIGTERM) after {len(rows)} of {len(configs)} configurations; pre-pass table skipped.**")
        return 1
    if not args.no_prepass:
        print("\n".join(prepass_table(args, device, dtype, args.rep)))
    return 0


class _Stopped(Exception):
    """Raised by the SIGTERM handler."""


if __name__ == "__main__":
    raise SystemExit(main())
