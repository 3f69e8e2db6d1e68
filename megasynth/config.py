"""The run configuration: a tree of dataclasses, loaded from TOML, with dotted command-line overrides.

    cfg = load_config("examples/configs/tiny.toml", ["--train.steps=100", "--optim.lr", "3e-4"])

Every field carries a docstring (the string literal under it); `describe_config()` turns them into `--help`.
Unknown keys and values of the wrong type are errors that name the key, so a typo never silently becomes a
default. `save_config()` writes the resolved tree back as TOML into the run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from megasynth.io import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file, when there is one)."""


AttentionCore = Literal["auto", "flash_attn", "cudnn", "flash", "triton", "reference"]
"""The attention cores model.attention_core may name (see megasynth/kernels/attention_core.py)."""


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
    attention: Literal["sdpa", "triton"] = "sdpa"
    """Attention implementation. 'sdpa': QK-norm, RoPE and PyTorch attention as separate ops (SDPA; with
    document masking FlexAttention with a document block mask on CUDA, causal SDPA per document elsewhere; never
    a dense [B, 1, S, S] mask). 'triton': the fused Triton QK-norm+RoPE pre-pass, then the attention core chosen
    by model.attention_core (varlen over documents with cu_seqlens/max_seqlen). Needs model.qk_norm=true."""
    attention_core: AttentionCore = "auto"
    """With model.attention='triton': the attention core after the pre-pass. 'auto': the fastest core available
    on the machine: flash-attn (FA3's flash_attn_interface on Hopper, else FA2 varlen) when installed, else SDPA
    cuDNN (batched inputs, sm_90) or our Triton kernel (see kernels/attention_core.py). 'flash_attn': the flash-attn
    package (the [gpu] extra; bf16/fp16, sm_80+). 'cudnn': SDPA's cuDNN backend (batched only: no document
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


# ----------------------------------------------------------------------------------------------- docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field name: the string literal right under it}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_config(cfg: Config | None = None) -> str:
    """Every key with its type, current value and docstring: the body of `--help`."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines.append(f"[{section.name}]")
        docs = field_docs(type(sub))
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            lines.append(f"  --{section.name}.{f.name}={_format_value(value)}  ({_type_name(hints[f.name])})")
            lines.append(textwrap.fill(docs.get(f.name, ""), 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _format_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{k}={_format_value(v)}" for k, v in dataclasses.asdict(value).items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------------------------- coercion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting int -> float, tables -> dataclasses)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config schema")  # pragma: no cover
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; known keys here: {', '.join(known)}")


def _build(cls: type, table: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}" if prefix else key, names)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in table.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--a.b=1", "--c.d", "x"] -> {"a.b": 1, "c.d": "x"}; anything else is an error naming the argument."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value: write --{body}=VALUE")
        out[key] = _parse_value(raw)
        i += 1
    return out


def _set_dotted(table: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = table
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _check_override_key(key: str) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{key}': expected section.key (e.g. train.steps)")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if parts[0] not in sections:
        raise _unknown_key(parts[0], list(sections))
    sub = typing.get_type_hints(Config)[parts[0]]
    names = [f.name for f in dataclasses.fields(sub)]
    if parts[1] not in names:
        raise _unknown_key(key, names)


# ----------------------------------------------------------------------------------------------- load / save


def config_from_dict(table: dict, source: str = "") -> Config:
    try:
        cfg = _build(Config, table, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    validate_config(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the TOML file (if any) <- dotted overrides; validated."""
    table: dict = {}
    source = ""
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for key, value in parse_overrides(overrides or []).items():
        _check_override_key(key)
        _set_dotted(table, key, value)
    return config_from_dict(table, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML, atomically."""
    import tomli_w  # noqa: PLC0415

    atomic_write_text(path, tomli_w.dumps(config_to_dict(cfg)))


def validate_config(cfg: Config) -> None:
    """Range and cross-field checks that a type check cannot make. The first problem found is raised as one
    ConfigError naming the key, its value and what is expected."""
    problem = next(_config_problems(cfg), None)
    if problem is not None:
        raise ConfigError(problem)


def _config_problems(cfg: Config) -> Iterator[str]:
    """Every check in order, lazily: a generator stops at the first problem its consumer takes, so a check runs
    only after the checks it depends on have passed (model.dim % model.n_heads only once model.n_heads >= 1)."""
    m, d, par, o, t = cfg.model, cfg.data, cfg.parallel, cfg.optim, cfg.train

    def at_least(key: str, value: int, low: int) -> Iterator[str]:
        if value < low:
            yield f"{key} must be >= {low}, got {value}"

    def positive_number(key: str, value: float) -> Iterator[str]:
        if not (math.isfinite(value) and value > 0):
            yield f"{key} must be a finite number > 0, got {value}"

    def number_in(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> Iterator[str]:
        if not (low <= value and (value < high if high_open else value <= high)):  # NaN fails every comparison
            yield f"{key} must be within [{low}, {high}{')' if high_open else ']'}, got {value}"

    # ---- model
    yield from at_least("model.vocab_size", m.vocab_size, 1)
    yield from at_least("model.dim", m.dim, 1)
    yield from at_least("model.n_layers", m.n_layers, 1)
    yield from at_least("model.n_heads", m.n_heads, 1)
    yield from at_least("model.n_kv_heads", m.n_kv_heads, 0)
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        yield f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}"
    yield from at_least("model.head_dim", m.head_dim, 0)
    if m.head_dim == 0 and m.dim % m.n_heads:
        yield f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; set model.head_dim"
    if m.head_dim % 2:
        yield f"model.head_dim must be even (RoPE rotates pairs), got {m.head_dim}"
    if m.head_dim == 0 and (m.dim // m.n_heads) % 2:
        yield (f"the head dimension model.dim / model.n_heads = {m.dim // m.n_heads} must be even (RoPE rotates "
               "pairs); change model.dim or model.n_heads, or set model.head_dim")
    yield from at_least("model.ffn_dim", m.ffn_dim, 0)
    yield from positive_number("model.norm_eps", m.norm_eps)
    yield from positive_number("model.rope_theta", m.rope_theta)
    yield from at_least("model.max_seq_len", m.max_seq_len, 1)
    yield from positive_number("model.init_std", m.init_std)
    if m.attention == "triton" and not m.qk_norm:
        yield "model.attention='triton' fuses QK-norm into attention: it needs model.qk_norm=true"
    if m.attention == "triton" and m.attention_core in ("cudnn", "flash") and d.document_masking:
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
    yield from at_least("data.seq_len", d.seq_len, 1)
    if d.seq_len > m.max_seq_len:
        yield f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
    if not d.max_repetition > 0:  # inf is allowed: never warn
        yield f"data.max_repetition must be > 0, got {d.max_repetition}"
    yield from at_least("data.num_workers", d.num_workers, 0)

    # ---- parallel
    yield from at_least("parallel.tp", par.tp, 1)

    # ---- optim
    yield from positive_number("optim.lr", o.lr)
    yield from number_in("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    yield from at_least("optim.warmup_steps", o.warmup_steps, 0)
    yield from number_in("optim.decay_fraction", o.decay_fraction, 0.0, 1.0)
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        yield f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}"
    yield from number_in("optim.beta1", o.beta1, 0.0, 1.0, high_open=True)
    yield from number_in("optim.beta2", o.beta2, 0.0, 1.0, high_open=True)
    yield from positive_number("optim.eps", o.eps)
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        yield f"optim.grad_clip must be a finite number >= 0 (0 disables clipping), got {o.grad_clip}"

    # ---- train
    yield from at_least("train.steps", t.steps, 0)
    yield from at_least("train.global_batch_size", t.global_batch_size, 1)
    yield from at_least("train.micro_batch_size", t.micro_batch_size, 1)
    yield from at_least("train.seed", t.seed, 0)  # numpy's generators refuse negative seeds
    if not t.run_dir:
        yield "train.run_dir is empty"
    yield from at_least("train.checkpoint_every", t.checkpoint_every, 0)
    yield from at_least("train.keep_last", t.keep_last, 0)
    yield from at_least("train.eval_every", t.eval_every, 0)
    yield from at_least("train.eval_batches", t.eval_batches, 1)
    yield from at_least("train.log_every", t.log_every, 0)
    yield from at_least("train.max_nonfinite_steps", t.max_nonfinite_steps, 1)
