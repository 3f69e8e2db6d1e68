"""Training throughput of a config: tokens/s, TFLOP/s and MFU over N optimizer steps after a warmup.

    python bench/train_throughput.py --config examples/configs/tiny.toml --steps 30
    python bench/train_throughput.py --config examples/configs/llama-1b.toml --steps 20 --train.device=cuda

Runs the trainer's own step (megasynth.train.train_step: accumulation, clipping, AdamW) in one process on
random tokens written to a temporary dataset prefix, with the config's model, batch sizes, dtype and
parallel options; no evaluation, checkpoints or logging in the timed region. Prints a Markdown table row
set for docs/benchmarks.md. FLOPs follow Megatron's formula (megasynth.model.flops_per_token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megasynth.config import ConfigError, load_config
from megasynth.data.gpt_dataset import GPTDataset
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter, smallest_token_dtype
from megasynth.data.loader import DistributedBatchLoader
from megasynth.distributed import destroy_distributed, init_distributed
from megasynth.metrics import memory_gb, peak_flops
from megasynth.model import build_model, flops_per_token
from megasynth.train import build_optimizer, parallelize_model, train_step


def write_random_tokens(prefix: Path, vocab_size: int, num_tokens: int, seed: int = 0) -> None:
    """Documents of random ids (lengths 64..1024) until num_tokens; the content is irrelevant to speed."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, smallest_token_dtype(vocab_size), metadata={"vocab_size": vocab_size}) as w:
        written = 0
        while written < num_tokens:
            n = int(rng.integers(64, 1025))
            w.add_document(rng.integers(0, vocab_size, size=n))
            written += n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="TOML config to measure (model, batch sizes, dtype)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first: allocator, kernel autotuning, torch.compile (default 5)")
    parser.epilog = "Any other --section.key=VALUE overrides the config, as for python -m megasynth.train."
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    info = init_distributed(cfg.parallel.tp, cfg.train.device)
    device, t = info.device, cfg.train
    dtype = t.dtype if device.type == "cuda" else "float32"
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random"
        write_random_tokens(prefix, cfg.model.vocab_size, total * t.global_batch_size * (cfg.data.seq_len + 1) + 1024)
        dataset = GPTDataset(IndexedDataset(prefix), seq_len=cfg.data.seq_len, num_samples=total * t.global_batch_size,
                             seed=t.seed)
        loader = DistributedBatchLoader(dataset, global_batch_size=t.global_batch_size,
                                        micro_batch_size=t.micro_batch_size, dp_rank=info.dp_rank,
                                        dp_size=info.dp_size, document_masking=cfg.data.document_masking,
                                        device=device)
        model = build_model(cfg.model, device, seed=t.seed)
        n_params = sum(p.numel() for p in model.parameters())
        model = parallelize_model(model, info, cfg.parallel,
                                  torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        optimizer = build_optimizer(model, cfg.optim, device)

        def one_step() -> None:
            train_step(model, optimizer, loader.next_step(), info=info, grad_clip=cfg.optim.grad_clip, dtype=dtype)

        for _ in range(args.warmup):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            one_step()  # train_step reads the loss with .item(), which waits for the device
        seconds = time.perf_counter() - started

    tokens = args.steps * t.global_batch_size * cfg.data.seq_len
    tokens_per_s = tokens / seconds
    flops_per_s = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / info.world_size
    peak = peak_flops(device, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if info.is_main:
        print("| config | device | params | seq | global batch | dtype | tokens/s | TFLOP/s | MFU | step (s) | mem (GiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.config} | {device_name} x{info.world_size} | {n_params / 1e6:.1f}M | {cfg.data.seq_len} | "
              f"{t.global_batch_size} | {dtype} | {tokens_per_s:,.0f} | {flops_per_s / 1e12:.3g} | "
              f"{'n/a' if peak is None else f'{100 * flops_per_s / peak:.1f}%'} | {seconds / args.steps:.3f} | "
              f"{memory_gb(device):.2f} |")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
