"""Make an unmodified `Transformer` parallel: tensor parallel -> activation checkpointing -> compile -> FSDP2.

    model = parallelize_model(model, dist_info, cfg.parallel, compute_dtype)   # in place; returns the model
    with loss_parallel_context(dist_info):                                      # around forward AND backward
        loss = model(input_ids, labels, doc_ids=doc_ids)
        loss.backward()

The order, the tensor-parallel layout and the kernels under TP: docs/parallel.md.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)

from megasynth.config import ConfigError, ParallelConfig
from megasynth.distributed import DistInfo
from megasynth.model import Transformer, resolved_dims


def parallelize_model(model: Transformer, dist_info: DistInfo, parallel_cfg: ParallelConfig,
                      compute_dtype: torch.dtype = torch.float32, *, compile_backend: str = "inductor") -> Transformer:
    """Apply TP -> activation checkpointing -> compile -> FSDP2 to `model` in place and return it.

    `model` must hold its initial weights already, identical on every rank (the trainer seeds them): TP and
    FSDP keep each rank's slice of the full tensors, they do not re-initialise. `compile_backend` matters only
    with parallel.compile (benchmarks' CPU smoke runs use "aot_eager": inductor's C++ builds take minutes).
    """
    check_parallel_shape(model.cfg, dist_info)
    if dist_info.world_size > 1 and dist_info.mesh is None:
        raise ConfigError(f"{dist_info.world_size} ranks but no device mesh: build dist_info with init_distributed()")
    if dist_info.tp_size > 1:
        apply_tensor_parallel(model, dist_info.mesh["tp"])
    apply_activation_checkpointing(model, parallel_cfg.activation_checkpoint)
    if parallel_cfg.compile:
        apply_compile(model, compile_backend)
    if dist_info.dp_size > 1:
        # bf16 gathered parameters only where the step computes in bf16 anyway: fp32 elsewhere keeps parity.
        bf16 = (dist_info.device.type == "cuda" and parallel_cfg.param_dtype == "bfloat16"
                and compute_dtype == torch.bfloat16)
        param_dtype = torch.bfloat16 if bf16 else torch.float32
        apply_fsdp(model, dist_info.mesh["dp"], param_dtype=param_dtype,
                   reshard_after_forward=parallel_cfg.fsdp_reshard_after_forward)
    if dist_info.tp_size > 1:
        # Registered after FSDP's own forward hooks, so FSDP sees (and hooks its backward onto) the DTensor.
        model.register_forward_hook(_outputs_to_local)
    return model


_loss_parallel_depth = 0  # > 0 inside loss_parallel_context (checked by _check_tp_inputs)


@contextlib.contextmanager
def loss_parallel_context(dist_info: DistInfo):
    """The context the forward AND the backward of a loss must run in under TP: torch's `loss_parallel()`,
    which computes the cross-entropy of vocab-sharded logits with two small all-reduces per token (max and
    sum of exp) instead of gathering [B, S, V]. Enter it around the whole train step (or evaluation); a
    no-op when tp == 1. A TP model asked for a loss outside it raises a RuntimeError saying so.
    """
    global _loss_parallel_depth
    # Nested entries are free: torch's context would switch the loss ops off when the inner one exits.
    inner = loss_parallel() if dist_info.tp_size > 1 and _loss_parallel_depth == 0 else contextlib.nullcontext()
    _loss_parallel_depth += 1
    try:
        with inner:
            yield
    finally:
        _loss_parallel_depth -= 1


def _check_tp_inputs(module, args, kwargs, *, tp: int):
    """Pre-forward hook of a TP model: say plainly what would otherwise fail deep inside DTensor."""
    input_ids = args[0] if args else kwargs["input_ids"]
    if input_ids.shape[-1] % tp:
        raise ValueError(f"sequence length {input_ids.shape[-1]} is not divisible by parallel.tp={tp}: sequence "
                         "parallelism splits every sequence evenly over the tp ranks (choose data.seq_len as a "
                         "multiple of tp)")
    labels = args[1] if len(args) > 1 else kwargs.get("labels")
    if labels is not None and _loss_parallel_depth == 0:
        raise RuntimeError("under tensor parallelism (parallel.tp > 1) the loss is vocab-parallel: run the forward "
                           "and the backward inside `with megasynth.parallelize.loss_parallel_context(dist_info):`")


def check_parallel_shape(cfg, dist_info: DistInfo) -> None:
    """Raise ConfigError, naming the keys, when the model cannot be split over tp ranks."""
    tp = dist_info.tp_size
    # init_distributed refuses this too; here for a DistInfo built another way (parallelize_model is public).
    if dist_info.world_size % tp != 0:
        raise ConfigError(f"parallel.tp={tp} does not divide the world size {dist_info.world_size}")
    if tp == 1:
        return
    n_kv, _, ffn = resolved_dims(cfg)
    if cfg.n_heads % tp or n_kv % tp:
        raise ConfigError(f"model.n_heads={cfg.n_heads} and model.n_kv_heads={n_kv} must both be divisible by "
                          f"parallel.tp={tp}: tensor parallelism gives each rank whole heads")
    if ffn % tp:
        raise ConfigError(f"the MLP width (model.ffn_dim={ffn}) must be divisible by parallel.tp={tp}")
    if cfg.attention == "fused_qknorm_rope":
        # The fused kernel takes the QK-norm weights as arguments; under TP they are replicated DTensors while
        # q and k are local head shards, a mix DTensor refuses. Supporting it needs the model to hand the
        # kernel `weight.to_local(grad_placements=[Partial()])` (a hook in model.py), not done yet.
        raise ConfigError(f"model.attention='fused_qknorm_rope' does not run with parallel.tp={tp} yet; use "
                          "model.attention='sdpa' for tensor-parallel runs")
    if cfg.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} must be divisible by parallel.tp={tp} (the embedding "
                          "and the output head are split by rows); round it up: the extra rows are never a target")


# ----------------------------------------------------------------------------------------------- tensor parallel


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    """Shard `model` over the 1-D mesh `tp_mesh` (Megatron layout with sequence-parallel norms), in place."""
    tied = model.cfg.tie_embeddings
    parallelize_module(model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # use_local_output=False keeps the logits a DTensor sharded over the vocabulary for loss_parallel().
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for block in model.layers.values():
        plan = {
            "input_layernorm": SequenceParallel(),
            # The block calls self_attn(x, attention_inputs): gather x over the sequence, leave the rest alone.
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        parallelize_module(block, tp_mesh, plan)
        for norm in (block.self_attn.q_norm, block.self_attn.k_norm):
            if norm is not None:
                apply_head_sharded_norm(norm, tp_mesh)
    if tied:
        # parallelize_module swapped each module's parameter for its own DTensor; both are Shard(0) of the same
        # initial matrix, so pointing the head at the embedding's restores the tie without moving data.
        model.lm_head.weight = model.embed_tokens.weight
    model.fused_loss = False  # logits -> F.cross_entropy, which loss_parallel() makes vocab-parallel
    model.register_forward_pre_hook(functools.partial(_check_tp_inputs, tp=tp_mesh.size()), with_kwargs=True)


def apply_head_sharded_norm(norm: nn.Module, tp_mesh) -> None:
    """QK-norm under TP: a replicated weight over local q (or k) [B, S, H/tp, D] viewed as head-sharded DTensors,
    so the weight's gradient is all-reduced over tp (docs/parallel.md)."""

    def to_head_sharded(module, inputs, mesh):
        (x,) = inputs
        return (DTensor.from_local(x, mesh, [Shard(2)], run_check=False),)

    def to_local(module, output, mesh):
        return output.to_local()

    distribute_module(norm, tp_mesh, input_fn=to_head_sharded, output_fn=to_local)  # parameters: Replicate


def _outputs_to_local(module, args, output):
    """Forward hook: the replicated loss -> its local value; vocab-sharded logits -> the full logits."""
    if isinstance(output, DTensor):
        return output.full_tensor()
    return output


# ----------------------------------------------------------------------------------------------- memory and speed


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute block activations in the backward: "none", "selective" (blocks 0, 2, 4, ...) or "full"
    (docs/parallel.md)."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ConfigError(f"parallel.activation_checkpoint={mode!r}: expected 'none', 'selective' or 'full'")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: PLC0415

    for name, block in list(model.layers.items()):
        if mode == "full" or int(name) % 2 == 0:
            # preserve_rng_state=False: nothing in a block draws random numbers (no dropout).
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer, backend: str = "inductor") -> None:
    """torch.compile each block in place (`Module.compile` keeps parameter names; blocks repeat, so one graph
    is compiled and reused). `backend` other than inductor is for tests and debugging (e.g. "aot_eager")."""
    for block in model.layers.values():
        block.compile(backend=backend)


def apply_fsdp(model: Transformer, dp_mesh, *, param_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> None:
    """FSDP2: shard each block, then the root (embedding, final norm, head) over `dp_mesh` (docs/parallel.md)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
