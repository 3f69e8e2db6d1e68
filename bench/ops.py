"""Benchmark the fused training ops (rms_norm, QK-norm + RoPE, swiglu, linear cross-entropy) against PyTorch.
Prints Markdown.

    python bench/ops.py                      # on a GPU: Llama-8B-like shapes in bf16
    python bench/ops.py --cpu-smoke          # tiny fp32 shapes through the Triton interpreter (checks the script)

rms_norm, the QK-norm + RoPE attention pre-pass (qknorm_rope) and swiglu, forward and backward: achieved
bandwidth in GB/s, counting each input read once and each output written once (the least traffic any
implementation needs), as a fraction of the measured device copy bandwidth (a large device-to-device copy, read +
write), against torch eager (the references) and torch.compile of the same references; for qknorm_rope also the
model's unfused chain (rms_norm per head, then the eager rotation). The pre-pass's target is >= 80% of copy
bandwidth. Linear cross-entropy (forward + backward, vocab 128k by default): time and peak memory above the inputs
(torch.cuda.max_memory_allocated) of the fused Triton path, the chunked PyTorch path, and the
reference that materialises the logits and calls F.cross_entropy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_time: float) -> float:
    """Mean time of one call: triton's do_bench on CUDA (clears L2 between calls), a timed loop on CPU."""
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=25, rep=max(1, int(min_time * 1e3))) / 1e3
    fn()  # warm-up: first interpreter call builds the kernel's Python
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def copy_bandwidth(device: torch.device, nbytes: int, min_time: float) -> float:
    """Bytes per second moved by dst.copy_(src) (read + write) on a buffer of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds_per_call(lambda: dst.copy_(src), device, min_time)


def elementwise_rows(name, impls, make_inputs, bytes_fwd, bytes_bwd, device, min_time):
    """Time forward and backward of each impl(*inputs) -> [(op, direction, impl, seconds, bytes)].

    An impl returns one tensor or a tuple of them (qknorm_rope returns q_hat, k_hat)."""
    rows = []
    for impl_name, fn in impls.items():
        inputs = make_inputs()
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        grad_out = tuple(torch.randn_like(o) for o in out)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        fwd = seconds_per_call(lambda: fn(*inputs), device, min_time)
        bwd = seconds_per_call(
            lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True), device, min_time
        )
        rows.append((name, "fwd", impl_name, fwd, bytes_fwd))
        rows.append((name, "bwd", impl_name, bwd, bytes_bwd))
        del out, grad_out, inputs
    return rows


def bench_rms_norm(rows_n, hidden, dtype, device, impls, min_time):
    size = dtype.itemsize

    def make():
        x = torch.randn(rows_n, hidden, dtype=dtype, device=device, requires_grad=True)
        w = torch.ones(hidden, dtype=dtype, device=device, requires_grad=True)
        return x, w, 1e-6

    # fwd: read x, w; write y, rstd (fp32). bwd: read dy, x, w, rstd; write dx, dw.
    fwd = 2 * rows_n * hidden * size + hidden * size + 4 * rows_n
    bwd = 3 * rows_n * hidden * size + 2 * hidden * size + 4 * rows_n
    return elementwise_rows(f"rms_norm [{rows_n}, {hidden}]", impls, make, fwd, bwd, device, min_time)


def bench_qknorm_rope(tokens, heads, kv_heads, head_dim, dtype, device, impls, min_time):
    """The attention pre-pass on q [B, S, Hq, D], k [B, S, Hkv, D] with one [S, D/2] table shared by the rows."""
    from megasynth.kernels.rope import rope_cos_sin  # noqa: PLC0415

    seq = min(tokens, 4096)
    batch = max(1, tokens // seq)
    n = batch * seq * (heads + kv_heads)  # head vectors
    size = dtype.itemsize
    cos, sin = rope_cos_sin(torch.arange(seq, device=device), head_dim)

    def make():
        q = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        k = torch.randn(batch, seq, kv_heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        wq, wk = (torch.ones(head_dim, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        return q, k, wq, wk, cos, sin

    # fwd: read q, k, cos, sin; write q_hat, k_hat, rstd (fp32 per head vector).
    # bwd: read dq_hat, dk_hat, q, k, rstd, cos, sin; write dq, dk (weights and their gradients: negligible).
    tables = 2 * seq * (head_dim // 2) * 4
    fwd = 2 * n * head_dim * size + 4 * n + tables
    bwd = 3 * n * head_dim * size + 4 * n + tables
    name = f"qknorm_rope [{batch}, {seq}, {heads}+{kv_heads}, {head_dim}]"
    return elementwise_rows(name, impls, make, fwd, bwd, device, min_time)


def bench_swiglu(rows_n, ffn, dtype, device, impls, min_time):
    n = rows_n * ffn

    def make():
        return tuple(torch.randn(rows_n, ffn, dtype=dtype, device=device, requires_grad=True) for _ in range(2))

    # fwd: read gate, up; write out. bwd: read dout, gate, up; write dgate, dup.
    return elementwise_rows(
        f"swiglu [{rows_n}, {ffn}]", impls, make, 3 * n * dtype.itemsize, 5 * n * dtype.itemsize, device, min_time
    )


def bench_linear_ce(tokens, hidden, vocab, dtype, device, impls, min_time):
    """-> [(impl, seconds fwd+bwd, peak bytes above inputs or None on CPU, error or None)]."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=device, generator=gen) * 0.1).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    results = []
    for name, fn in impls.items():

        def step():
            h.grad = w.grad = None
            fn(h, w, t).backward()

        try:
            peak = None
            if device.type == "cuda":
                step()  # warm-up outside the peak measurement (autotuning, allocator)
                h.grad = w.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            results.append((name, seconds_per_call(step, device, min_time), peak, None))
        except torch.OutOfMemoryError as exc:
            results.append((name, float("nan"), None, f"out of memory: {str(exc).splitlines()[0]}"))
        h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown_elementwise(rows, copy_bw):
    eager = {(op, d): s for op, d, impl, s, _ in rows if impl == "eager"}
    lines = [
        f"Device copy bandwidth: {copy_bw / 1e9:,.0f} GB/s (read + write).",
        "",
        "| op | pass | impl | time (us) | GB/s | % of copy | speed-up vs eager |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for op, direction, impl, sec, nbytes in rows:
        speedup = eager[(op, direction)] / sec if (op, direction) in eager else float("nan")
        lines.append(
            f"| {op} | {direction} | {impl} | {sec * 1e6:,.1f} | {nbytes / sec / 1e9:,.1f} | "
            f"{100 * nbytes / sec / copy_bw:.0f}% | {speedup:.2f}x |"
        )
    return lines


def markdown_linear_ce(results, tokens, hidden, vocab, dtype_name):
    ref = {name: (sec, peak) for name, sec, peak, _ in results}.get("logits + F.cross_entropy", (None, None))
    lines = [
        f"Linear cross-entropy, forward + backward: N = {tokens} tokens, H = {hidden}, V = {vocab}, {dtype_name}.",
        "",
        "| impl | time (ms) | vs reference | peak memory above inputs (GiB) | vs reference |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sec, peak, err in results:
        if err:
            lines.append(f"| {name} | {err} | | | |")
            continue
        t_ratio = f"{ref[0] / sec:.2f}x" if ref[0] else "n/a"
        mem = f"{peak / 2**30:.2f}" if peak is not None else "n/a (CPU)"
        m_ratio = f"{peak / ref[1]:.3f}" if peak is not None and ref[1] else "n/a"
        lines.append(f"| {name} | {sec * 1e3:,.2f} | {t_ratio} | {mem} | {m_ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny fp32 shapes on the CPU through the Triton interpreter (TRITON_INTERPRET=1); "
                             "checks that the script runs, the numbers mean nothing")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16",
                        help="activation and weight dtype on the GPU (default bf16; --cpu-smoke uses fp32)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="rows for rms_norm and swiglu, tokens for the cross-entropy (default 16384)")
    parser.add_argument("--hidden", type=int, default=4096, help="model hidden size (default 4096)")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="QK-norm row size: rms_norm is also run on tokens * 32 rows of it, and qknorm_rope's head "
                             "dim (default 128)")
    parser.add_argument("--heads", type=int, default=32, help="query heads for qknorm_rope (default 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key heads for qknorm_rope (default 8)")
    parser.add_argument("--ffn", type=int, default=14336, help="MLP intermediate size for swiglu (default 14336)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary for the cross-entropy (default 128256)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--no-reference-ce", action="store_true",
                        help="skip the cross-entropy reference (it needs ~30 GiB at the default shape)")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds to spend timing each measurement (default 0.2)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        # Must be set before the kernel modules are imported: @triton.jit reads it when it decorates.
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, dtype_name = torch.device("cpu"), torch.float32, "fp32"
        args.tokens, args.hidden, args.head_dim, args.ffn, args.vocab = 32, 64, 16, 96, 1000
        args.heads, args.kv_heads = 4, 2
        args.no_compile, args.min_time = True, 0.0
        copy_bytes = 1 << 24
    elif not torch.cuda.is_available():
        print("bench/ops.py: no CUDA device, nothing to measure (run with --cpu-smoke to exercise the script)",
              file=sys.stderr)
        return 0
    else:
        device, dtype, dtype_name = torch.device("cuda"), DTYPES[args.dtype], args.dtype
        copy_bytes = 1 << 30

    from megasynth.kernels import rms_norm  # noqa: PLC0415
    from megasynth.kernels._cross_entropy_triton import linear_cross_entropy_triton  # noqa: PLC0415
    from megasynth.kernels._qknorm_rope_triton import qknorm_rope_triton  # noqa: PLC0415
    from megasynth.kernels._rms_norm_triton import rms_norm_triton  # noqa: PLC0415
    from megasynth.kernels._swiglu_triton import swiglu_triton  # noqa: PLC0415
    from megasynth.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref  # noqa: PLC0415
    from megasynth.kernels.qknorm_rope import qknorm_rope_ref  # noqa: PLC0415
    from megasynth.kernels.rms_norm import rms_norm_ref  # noqa: PLC0415
    from megasynth.kernels.rope import apply_rope_ref  # noqa: PLC0415
    from megasynth.kernels.swiglu import swiglu_ref  # noqa: PLC0415

    rms_impls = {"triton": rms_norm_triton, "eager": rms_norm_ref}
    swiglu_impls = {"triton": swiglu_triton, "eager": swiglu_ref}

    def unfused_chain(q, k, wq, wk, cos, sin):  # what the model's sdpa path runs: dispatched rms_norm, eager rope
        return apply_rope_ref(rms_norm(q, wq), cos, sin), apply_rope_ref(rms_norm(k, wk), cos, sin)

    qk_impls = {"triton": qknorm_rope_triton, "eager": qknorm_rope_ref, "unfused (model chain)": unfused_chain}
    if not args.no_compile:
        qk_impls["torch.compile"] = torch.compile(qknorm_rope_ref)
        rms_impls["torch.compile"] = torch.compile(rms_norm_ref)
        swiglu_impls["torch.compile"] = torch.compile(swiglu_ref)
    ce_impls = {"fused triton": linear_cross_entropy_triton, "chunked torch": linear_cross_entropy_chunked}
    if not args.no_reference_ce:
        ce_impls["logits + F.cross_entropy"] = linear_cross_entropy_ref

    cases = [
        ("copy", lambda: copy_bandwidth(device, copy_bytes, args.min_time)),
        ("rms_norm hidden", lambda: bench_rms_norm(args.tokens, args.hidden, dtype, device, rms_impls, args.min_time)),
        ("rms_norm qk", lambda: bench_rms_norm(args.tokens * 32, args.head_dim, dtype, device, rms_impls,
                                               args.min_time)),
        ("qknorm_rope", lambda: bench_qknorm_rope(args.tokens, args.heads, args.kv_heads, args.head_dim, dtype,
                                                  device, qk_impls, args.min_time)),
        ("swiglu", lambda: bench_swiglu(args.tokens, args.ffn, dtype, device, swiglu_impls, args.min_time)),
        ("linear_ce", lambda: bench_linear_ce(args.tokens, args.hidden, args.vocab, dtype, device, ce_impls,
                                              args.min_time)),
    ]
    results = {}
    for name, run in tqdm(cases, desc="bench/ops", file=sys.stderr):
        results[name] = run()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (smoke)"
    print(f"\n## Fused ops on {where}, {dtype_name}, torch {torch.__version__}\n")
    elementwise = results["rms_norm hidden"] + results["rms_norm qk"] + results["qknorm_rope"] + results["swiglu"]
    print("\n".join(markdown_elementwise(elementwise, results["copy"])))
    qk = {d: nbytes / sec / results["copy"] for op, d, impl, sec, nbytes in results["qknorm_rope"] if impl == "triton"}
    verdict = "meets" if min(qk.values()) >= 0.8 else "misses"
    note = " (CPU smoke run: not a measurement)." if args.cpu_smoke else "."
    print(f"\nqknorm_rope (Triton) at {100 * qk['fwd']:.0f}% (fwd) and {100 * qk['bwd']:.0f}% (bwd) of copy "
          f"bandwidth: {verdict} the target of >= 80%{note}")
    print()
    print("\n".join(markdown_linear_ce(results["linear_ce"], args.tokens, args.hidden, args.vocab, dtype_name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
