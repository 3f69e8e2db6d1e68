"""Model FLOPs utilisation of llama-1b on one GPU: attention sdpa vs fused_qknorm_rope, with and without torch.compile.

    python bench/mfu.py                                   # CUDA: examples/configs/llama-1b.toml in bf16
    python bench/mfu.py --micro-batch-size 2 --seq-len 2048 --steps 20
    python bench/mfu.py --variants sdpa,fused_qknorm_rope:triton   # also pin the core (model.attention_core)
    python bench/mfu.py --cpu-smoke                       # no GPU: tiny.toml on the CPU, same code path

Each variant builds the model as the trainer does (meta device, init, `parallelize_model` with
parallel.compile on or off) and times the trainer's own step (`megasynth.train.train_step`: bf16 autocast,
fused AdamW, clipping) on fixed random micro-batches with documents of random length (document masking on, as
in training), after untimed warmup steps (allocator, autotuning, compilation). Output: a Markdown table for
docs/benchmarks.md.

MFU = achieved model FLOP/s / the device's dense bf16 peak (megasynth.metrics.peak_flops), with model FLOPs
from Megatron's formula (megasynth.model.flops_per_token: 6 x matmul parameters per token + causal attention,
recomputation not counted). With document masking attention does less work than the causal formula counts,
so MFU at long documents is the comparable number; this is the convention of Megatron and torchtitan.

--cpu-smoke runs every variant on the CPU in fp32 (kernels dispatch to their PyTorch references, compile uses
the aot_eager backend because inductor's C++ builds take minutes here): it checks the code path, its numbers
are not a benchmark. Without a GPU and without --cpu-smoke the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from megasynth.config import ConfigError, load_config
from megasynth.data.loader import IGNORE_INDEX, Batch
from megasynth.distributed import DistInfo
from megasynth.metrics import peak_flops
from megasynth.model import build_model, flops_per_token
from megasynth.parallelize import parallelize_model
from megasynth.train import build_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
ATTENTIONS = ("sdpa", "fused_qknorm_rope", "triton")  # triton: fused_qknorm_rope's former name


def parse_variants(spec: str, no_compile: bool) -> list[tuple[str, str | None, bool]]:
    """'sdpa,fused_qknorm_rope:flash_attn' -> [(attention, core or None, compiled)], each without then with compile.
    A ':core' suffix sets model.attention_core (only meaningful for fused_qknorm_rope); without it the config's
    core counts."""
    variants = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        attention, _, core = item.partition(":")
        if attention not in ATTENTIONS:
            raise ConfigError(f"--variants: {item!r}: expected sdpa, fused_qknorm_rope or fused_qknorm_rope:<core>")
        for compiled in (False,) if no_compile else (False, True):
            variants.append((attention, core or None, compiled))
    if not variants:
        raise ConfigError(f"--variants={spec!r}: expected a comma-separated list such as sdpa,fused_qknorm_rope")
    return variants


def random_batches(cfg, n: int, device: torch.device, seed: int = 0) -> list[Batch]:
    """n micro-batches of random tokens; documents of 64..seq_len tokens (ids restart at each row)."""
    gen = torch.Generator().manual_seed(seed)
    mb, seq, vocab = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (mb, seq + 1), generator=gen)
        starts = torch.rand(mb, seq, generator=gen) < 1.0 / max(64, seq // 4)  # mean document ~ seq/4 tokens
        doc_ids = torch.cumsum(starts, dim=1).to(torch.int32)
        labels = tokens[:, 1:].clone()
        labels[:, -1] = IGNORE_INDEX  # as if the last target were padding: exercises the ignore path
        batches.append(Batch(tokens[:, :-1].contiguous(), labels, doc_ids).to(device))
    return batches


def measure(cfg, device: torch.device, *, steps: int, warmup: int, accum: int, compile_backend: str) -> dict:
    """Tokens/s, TFLOP/s, MFU, step time and peak memory of the trainer's step for this config."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None, dp_rank=0, dp_size=1, tp_rank=0,
                    tp_size=1)
    dtype = cfg.train.dtype if device.type == "cuda" else "float32"
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    model = parallelize_model(model, info, cfg.parallel, torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                              compile_backend=compile_backend)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device)
    batches = random_batches(cfg, accum, device)

    def one_step() -> None:
        train_step(model, optimizer, batches, info=info, grad_clip=cfg.optim.grad_clip, dtype=dtype)

    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        one_step()  # train_step reads the loss with .item(), which waits for the device
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = accum * cfg.train.micro_batch_size * cfg.data.seq_len / seconds
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s
    peak = peak_flops(device, dtype)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer, batches
    return {"tokens_per_s": tokens_per_s, "tflops": flops / 1e12, "mfu": flops / peak if peak else None,
            "step_s": seconds, "mem_gb": mem}


def release(device: torch.device) -> None:
    """Forget compiled graphs and cached blocks so one variant does not inherit another's memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def variant_label(cfg, device: torch.device) -> str:
    """'sdpa', or 'fused_qknorm_rope (core X)' with the core the model's attention will actually run (auto
    resolved)."""
    if cfg.model.attention != "fused_qknorm_rope":
        return cfg.model.attention
    from megasynth.kernels.attention_core import available_backends, choose_core  # noqa: PLC0415

    cuda = device.type == "cuda"
    head_dim = cfg.model.head_dim or cfg.model.dim // cfg.model.n_heads
    dtype = torch.bfloat16 if cuda and cfg.train.dtype == "bfloat16" else torch.float32
    try:
        core = choose_core(cfg.model.attention_core, device_type=device.type,
                           capability=torch.cuda.get_device_capability(device) if cuda else None, dtype=dtype,
                           head_dim=head_dim, varlen=cfg.data.document_masking,
                           available=available_backends() if cuda else frozenset())
    except ValueError:
        core = "refused"
    shown = core if cfg.model.attention_core == core else f"{cfg.model.attention_core} -> {core}"
    return f"fused_qknorm_rope (core {shown})"


def format_row(attention: str, compiled: bool, result: dict | str) -> str:
    if isinstance(result, str):
        return f"| {attention} | {'yes' if compiled else 'no'} | failed: {result} | | | | |"
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    mem = "n/a" if result["mem_gb"] != result["mem_gb"] else f"{result['mem_gb']:.1f}"
    return (f"| {attention} | {'yes' if compiled else 'no'} | {result['tokens_per_s']:,.0f} | "
            f"{result['tflops']:.3g} | {mfu} | {result['step_s']:.3f} | {mem} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False,
                                     epilog="Any other --section.key=VALUE overrides the config (as for training).")
    parser.add_argument("--config", help="TOML config (default: examples/configs/llama-1b.toml on a GPU, "
                                         "examples/configs/tiny.toml with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every variant on the CPU (fp32, tiny model, compile via aot_eager) to check the "
                             "code path; the numbers mean nothing")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per variant (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps first, which include compilation (default 3; smoke 1)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default: the config's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's data.seq_len)")
    parser.add_argument("--variants", default="sdpa,fused_qknorm_rope",
                        help="comma-separated attention backends (sdpa, fused_qknorm_rope, or "
                             "fused_qknorm_rope:<core> to pin "
                             "model.attention_core: auto, flash_attn, cudnn, flash, triton, reference) to measure, "
                             "each without and with compile "
                             "(default sdpa,fused_qknorm_rope)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/mfu.py: no CUDA device, nothing to measure (MFU is a GPU number). "
              "Run with --cpu-smoke to check the code path on the CPU.")
        return 0
    smoke = args.cpu_smoke
    config = args.config or str(REPO / "examples" / "configs" / ("tiny.toml" if smoke else "llama-1b.toml"))
    overrides = [*overrides, f"--train.device={'cpu' if smoke else 'cuda'}"]
    if args.micro_batch_size:
        overrides.append(f"--train.micro_batch_size={args.micro_batch_size}")
    if args.seq_len:
        overrides.append(f"--data.seq_len={args.seq_len}")
    steps = args.steps if args.steps is not None else (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    try:
        base = load_config(config, overrides)
        if steps < 1 or warmup < 0 or args.accum < 1:
            raise ConfigError("--steps and --accum must be >= 1, --warmup >= 0")
        variants = parse_variants(args.variants, args.no_compile)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test, not a benchmark)"
    print(f"{Path(config).name} on {name}: seq {base.data.seq_len}, micro-batch {base.train.micro_batch_size} x "
          f"{args.accum}, {'fp32' if smoke else base.train.dtype}, {steps} timed steps after {warmup}; compile "
          f"backend {backend}\n")
    print("| attention | compile | tokens/s | TFLOP/s | MFU | step (s) | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for attention, core, compiled in variants:
        pinned = [f"--model.attention_core={core}"] if core else []
        label = attention
        try:
            cfg = load_config(config, [*overrides, *pinned, f"--model.attention={attention}",
                                       f"--parallel.compile={str(compiled).lower()}"])
            label = variant_label(cfg, device)
            result = measure(cfg, device, steps=steps, warmup=warmup, accum=args.accum, compile_backend=backend)
        except (RuntimeError, ValueError, ImportError, ConfigError, torch.OutOfMemoryError) as e:
            result = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"  # a result too
        print(format_row(label, compiled, result), flush=True)
        release(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
