"""The run configuration: a tree of dataclasses, loaded from TOML, with dotted command-line overrides.

    cfg = load_config("examples/configs/tiny.toml", ["--train.steps=100", "--optim.lr", "3e-4"])

Every field's docstring (the string literal under it) is its `--help` text (`describe_config()`); unknown keys and
wrong types are errors that name the key, so a typo never silently becomes a default (config_parse.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from megasynth.config_parse import ConfigError, build, describe, read_table
from megasynth.io import atomic_write_text

AttentionKind = Literal["sdpa", "fused_qknorm_rope"]
"""The values of model.attention."""
AttentionCore = Literal["auto", "flash_attn", "cudnn", "flash", "triton", "reference"]
"""The values of model.attention_core: 'auto' or one of the cores (megasynth.kernels.attention_core.CORES is
derived from this list; kept here because loading a config must not import torch)."""
# Values renamed since run directories saved them, {key: {old: new}}: an old config.toml still loads, with one
# warning, and resolves to the new name.
RENAMED_VALUES = {"model.attention": {"triton": "fused_qknorm_rope"}}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Rows of the embedding and of the output head; at least the tokenizer's vocabulary size."""
    dim: int = 768
    """Hidden size of the residual stream."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Query heads per attention layer."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means n_heads. Must divide n_heads."""
    head_dim: int = 0
    """Dimension of each head; 0 means dim // n_heads (Qwen3 sets it explicitly, e.g. 128)."""
    ffn_dim: int = 0
    """Hidden size of the SwiGLU MLP; 0 means Llama's rule: 8/3 * dim rounded up to a multiple of 256."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (block norms, final norm, QK-norm)."""
    rope_theta: float = 500000.0
    """RoPE base frequency (Llama 3 uses 500000, Qwen3 1000000)."""
    qk_norm: bool = True
    """RMSNorm over head_dim on q and k per head, after the projection and before RoPE (Qwen3)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output head."""
    max_seq_len: int = 4096
    """Longest position the RoPE table covers (training sequence length or generation limit)."""
    attention: AttentionKind = "sdpa"
    """Attention implementation. 'sdpa': QK-norm, RoPE and PyTorch attention as separate ops (SDPA; with
    document masking FlexAttention with a document block mask on CUDA, causal SDPA per document elsewhere; never
    a dense [B, 1, S, S] mask). 'fused_qknorm_rope': one fused QK-norm + RoPE pre-pass (Triton on CUDA), then the
    attention core named by model.attention_core (varlen over documents with cu_seqlens/max_seqlen). Needs
    model.qk_norm=true. Its former name 'triton' is still read, with a deprecation warning."""
    attention_core: AttentionCore = "auto"
    """With model.attention='fused_qknorm_rope': the attention core after the pre-pass. 'auto': the fastest core
    available on the machine: flash-attn (FA3's flash_attn_interface on Hopper, else FA2 varlen) when installed,
    else SDPA cuDNN (batched inputs, sm_90) or our Triton kernel (see kernels/attention_core.py). 'flash_attn': the
    flash-attn package (the [gpu] extra; bf16/fp16, sm_80+). 'cudnn': SDPA's cuDNN backend (batched only: no document
    masking). 'flash': SDPA's flash backend (batched only: no document masking). 'triton': our Triton flash kernel
    (every CUDA GPU; the CPU under TRITON_INTERPRET=1). 'reference': plain PyTorch with a dense mask (debugging
    only: O(S^2) memory). Ignored by model.attention='sdpa'."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled by 1/sqrt(2*n_layers)."""


@dataclass
class DataSource:
    path: str = ""
    """Dataset prefix (PREFIX.bin / PREFIX.idx / PREFIX.json)."""
    weight: float = 1.0
    """Share of the training tokens drawn from this source (weights are normalised over all sources)."""
    name: str = ""
    """Short name for logs and tables; defaults to the prefix's file name."""
    packing: Literal["concat", "pack"] = "concat"
    """How samples are cut: 'concat' lays documents end to end and cuts windows anywhere (pretraining);
    'pack' places whole examples into windows without splitting one, pads the rest, masks padding and
    attention across examples (SFT / pair data; examples longer than the window are truncated and counted)."""


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Training sources with weights (TOML: [[data.sources]] tables with path and weight)."""
    data_path: str = ""
    """Alternative to `sources` in Megatron's syntax: "0.3 /data/a 0.7 /data/b" (or a single prefix)."""
    valid_paths: list[str] = field(default_factory=list)
    """Held-out prefixes evaluated every train.eval_every steps (loss and perplexity, one line each)."""
    valid_packing: Literal["auto", "concat", "pack"] = "auto"
    """How held-out samples are cut (see DataSource.packing); 'auto' packs prefixes that carry a loss mask
    (their loss is then the masked loss over whole examples) and concatenates the others."""
    seq_len: int = 1024
    """Tokens per training sequence (each sample reads seq_len + 1 tokens)."""
    document_masking: bool = True
    """Attend only within each document and restart positions at document starts (from the sample index)."""
    cache_dir: str = ""
    """Where sample indices are cached; empty means RUN_DIR/index_cache."""
    max_repetition: float = 8.0
    """Warn when a source would be repeated more than this many epochs over the run."""
    allow_blend_change: bool = False
    """Resume even if the blend's fingerprint differs from the checkpoint's (otherwise an error)."""
    num_workers: int = 0
    """Background processes for batch assembly (0 reads in the training process; memory-mapped reads are cheap)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree (mesh dim `tp`); the data-parallel degree is world_size // tp (mesh dim `dp`)."""
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    """Recompute activations in the backward: none, selective (every other block), or full (every block)."""
    compile: bool = False
    """Compile each transformer block with torch.compile."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after each block's forward (ZeRO-3) instead of keeping them (ZeRO-2)."""
    param_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """FSDP2 mixed precision: dtype of gathered parameters for compute (reductions are always fp32). CPU runs use float32."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warmup: cosine decay, warmup-stable-decay, or constant."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rate."""
    decay_fraction: float = 0.2
    """WSD only: the last fraction of the steps over which the rate decays linearly to min_lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to parameters with 2+ dimensions (projections and the embedding), never to norms."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 32
    """Sequences per optimizer step across all data-parallel ranks (= micro_batch_size x dp x accumulation)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    seed: int = 1234
    """Seeds weights, data order and dropout-free sampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: cuda when available under auto."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype on CUDA (autocast); CPU runs always use float32."""
    run_dir: str = "runs/default"
    """Directory for the resolved config, metrics.jsonl, checkpoints and caches."""
    resume: str = "auto"
    """'auto' resumes from the newest complete checkpoint in run_dir; 'none' starts over, first moving an earlier
    run's checkpoints and metrics.jsonl to run_dir/earlier_runs/UTC-TIME/ (nothing is deleted); or a checkpoint
    path."""
    init_from: str = ""
    """Initialise weights (only) from this checkpoint directory, e.g. to fine-tune a pretrained model."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints; 0 keeps all."""
    eval_every: int = 200
    """Evaluate held-out loss every N steps (and at step 0 and the end); 0 disables."""
    eval_batches: int = 8
    """Micro-batches per held-out evaluation."""
    log_every: int = 10
    """Print a metrics line every N steps."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each such step is skipped)."""


@dataclass
class LogConfig:
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str = "megasynth"
    """W&B project name."""
    wandb_mode: Literal["online", "offline"] = "offline"
    """W&B mode; offline writes under run_dir/wandb and needs no network (sync later with `wandb sync`)."""
    wandb_run_name: str = ""
    """W&B run name; empty uses the run directory's name."""
    all_ranks: bool = False
    """Log from every rank (prefixed with the rank) instead of rank 0 only."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder's architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / data parallelism and memory savers."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, batch sizes, checkpoints, evaluation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging sinks."""


# ----------------------------------------------------------------------------------------------- load / save


def describe_config(cfg: Config | None = None) -> str:
    """Every key with its type, current value and docstring: the body of `--help`."""
    return describe(cfg or Config())


def config_from_dict(table: dict, source: str = "") -> Config:
    try:
        cfg = build(Config, table, "", RENAMED_VALUES)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    # Range and cross-field checks that a type check cannot make: the first problem, naming the key.
    problem = next(_config_problems(cfg), None)
    if problem is not None:
        raise ConfigError(problem)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the TOML file (if any) <- dotted overrides; validated."""
    return config_from_dict(read_table(Config, path, overrides or []), "" if path is None else str(path))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML, atomically."""
    import tomli_w  # noqa: PLC0415

    atomic_write_text(path, tomli_w.dumps(config_to_dict(cfg)))


def _config_problems(cfg: Config) -> Iterator[str]:
    """Every check in order, lazily: a generator stops at the first problem its consumer takes, so a check runs
    only after the checks it depends on have passed (model.dim % model.n_heads only once model.n_heads >= 1)."""
    m, d, par, o, t = cfg.model, cfg.data, cfg.parallel, cfg.optim, cfg.train

    def at_least(section: str, obj, **lows: int) -> Iterator[str]:
        for name, low in lows.items():
            if getattr(obj, name) < low:
                yield f"{section}.{name} must be >= {low}, got {getattr(obj, name)}"

    def positive_number(section: str, obj, *names: str) -> Iterator[str]:
        for name in names:
            value = getattr(obj, name)
            if not (math.isfinite(value) and value > 0):
                yield f"{section}.{name} must be a finite number > 0, got {value}"

    def number_in(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> Iterator[str]:
        if not (low <= value and (value < high if high_open else value <= high)):  # NaN fails every comparison
            yield f"{key} must be within [{low}, {high}{')' if high_open else ']'}, got {value}"

    # ---- model
    yield from at_least("model", m, vocab_size=1, dim=1, n_layers=1, n_heads=1, n_kv_heads=0)
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        yield f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}"
    yield from at_least("model", m, head_dim=0)
    if m.head_dim == 0 and m.dim % m.n_heads:
        yield f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; set model.head_dim"
    if m.head_dim % 2:
        yield f"model.head_dim must be even (RoPE rotates pairs), got {m.head_dim}"
    if m.head_dim == 0 and (m.dim // m.n_heads) % 2:
        yield (f"the head dimension model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE rotates "
               "pairs); change model.dim or model.n_heads, or set model.head_dim")
    yield from at_least("model", m, ffn_dim=0)
    yield from positive_number("model", m, "norm_eps", "rope_theta")
    yield from at_least("model", m, max_seq_len=1)
    yield from positive_number("model", m, "init_std")
    if m.attention == "fused_qknorm_rope" and not m.qk_norm:
        yield "model.attention='fused_qknorm_rope' fuses QK-norm into attention: it needs model.qk_norm=true"
    if m.attention == "fused_qknorm_rope" and m.attention_core in ("cudnn", "flash") and d.document_masking:
        yield (f"model.attention_core='{m.attention_core}' (torch SDPA) takes batched inputs only, but "
               "data.document_masking=true needs varlen attention: use 'auto', 'flash_attn' or 'triton', or set "
               "data.document_masking=false")

    # ---- data
    if d.sources and d.data_path:
        yield "set data.sources or data.data_path, not both"
    for i, s in enumerate(d.sources):
        if not s.path:
            yield f"data.sources[{i}].path is empty"
        if not (math.isfinite(s.weight) and s.weight >= 0):
            yield f"data.sources[{i}].weight must be a finite number >= 0, got {s.weight}"
    if d.sources and sum(s.weight for s in d.sources) <= 0:
        yield "data.sources: at least one weight must be > 0"
    for i, path in enumerate(d.valid_paths):
        if not path:
            yield f"data.valid_paths[{i}] is empty"
    yield from at_least("data", d, seq_len=1)
    if d.seq_len > m.max_seq_len:
        yield f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
    if not d.max_repetition > 0:  # inf is allowed: never warn
        yield f"data.max_repetition must be > 0, got {d.max_repetition}"
    yield from at_least("data", d, num_workers=0)

    # ---- parallel
    yield from at_least("parallel", par, tp=1)

    # ---- optim
    yield from positive_number("optim", o, "lr")
    yield from number_in("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    yield from at_least("optim", o, warmup_steps=0)
    yield from number_in("optim.decay_fraction", o.decay_fraction, 0.0, 1.0)
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        yield f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}"
    yield from number_in("optim.beta1", o.beta1, 0.0, 1.0, high_open=True)
    yield from number_in("optim.beta2", o.beta2, 0.0, 1.0, high_open=True)
    yield from positive_number("optim", o, "eps")
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        yield f"optim.grad_clip must be a finite number >= 0 (0 disables clipping), got {o.grad_clip}"

    # ---- train
    # seed >= 0: numpy's generators refuse negative seeds
    yield from at_least("train", t, steps=0, global_batch_size=1, micro_batch_size=1, seed=0)
    if not t.run_dir:
        yield "train.run_dir is empty"
    yield from at_least("train", t, checkpoint_every=0, keep_last=0, eval_every=0, eval_batches=1, log_every=0,
                        max_nonfinite_steps=1)
