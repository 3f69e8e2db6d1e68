"""The Llama-3 decoder with QK-norm (exactly Hugging Face's Qwen3ForCausalLM layout). No parallel code here.

    model = build_model(cfg.model, device="cuda", seed=0)       # meta-device construction, then init
    loss = model(input_ids, labels=labels, doc_ids=doc_ids)      # [B, S] -> scalar mean loss
    logits = model(input_ids)                                    # [B, S] -> [B, S, V]

Parameter names follow Qwen3 minus the leading `model.` (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, norm, lm_head), so
exporting to Hugging Face is a renaming. `model.attention` ("sdpa" or "fused_qknorm_rope") and documents
(`doc_ids`, never a dense mask): docs/kernels.md.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Protocol, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megasynth.config import AttentionCore, AttentionKind, ModelConfig
from megasynth.kernels import linear_cross_entropy, qknorm_rope_attention, rms_norm, rope_cos_sin, swiglu
from megasynth.kernels.attention_core import machine_facts, max_seqlen_of
from megasynth.kernels.rope import apply_rope_ref


def resolved_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(n_kv_heads, head_dim, ffn_dim) with the config's 0 = default rules applied."""
    n_kv = cfg.n_kv_heads or cfg.n_heads
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    ffn = cfg.ffn_dim or 256 * math.ceil(int(8 * cfg.dim / 3) / 256)
    return n_kv, head_dim, ffn


class KVCacheLike(Protocol):
    """What attention needs from a KV cache (megasynth.generate.KVCache implements it)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, S, Hkv, D] at the current positions; return all keys/values so far [B, Hkv, L, D]."""

    @property
    def attn_mask(self) -> torch.Tensor:
        """[B, 1, S, L] bool, True where a query may attend to a cached key."""


@dataclass
class AttentionInputs:
    """Per-forward attention state, computed once and shared by every layer. Without documents (and without a
    cache) block_mask and cu_seqlens are None: plain causal attention within each row."""

    cos: torch.Tensor  # [B, S, D/2] fp32, per token (positions may restart per document)
    sin: torch.Tensor
    block_mask: BlockMask | None = None  # sdpa on CUDA: document-causal FlexAttention mask (block-sparse)
    cu_seqlens: torch.Tensor | None = None  # int32 [N+1] over the flattened B*S tokens (fused; sdpa off CUDA)
    max_seqlen: int | None = None  # longest document, with cu_seqlens (the varlen cores size their grids by it)
    kv_cache: KVCacheLike | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        n_kv, head_dim, _ = resolved_dims(cfg)
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.fused = cfg.attention == "fused_qknorm_rope"
        self.core = cfg.attention_core
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * head_dim, cfg.dim, bias=False)
        # QK-norm: one weight of size head_dim shared by all heads (Qwen3), applied before RoPE.
        self.q_norm = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism the projections are sharded and each rank holds a subset of heads.
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        attend = self._fused if self.fused and inputs.kv_cache is None else self._unfused
        return self.o_proj(attend(q, k, v, inputs).reshape(bsz, seq, -1))

    def _fused(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        # With documents the batch is packed: [B*S, H, D] tokens, one varlen call over every document.
        bsz, seq, packed = q.shape[0], q.shape[1], inputs.cu_seqlens is not None
        q, k, v, cos, sin = (t.flatten(0, 1) if packed else t for t in (q, k, v, inputs.cos, inputs.sin))
        out = qknorm_rope_attention(q, k, v, self.q_norm.weight, self.k_norm.weight, cos, sin,
                                    cu_seqlens=inputs.cu_seqlens, max_seqlen=inputs.max_seqlen, eps=self.q_norm.eps,
                                    core=self.core)
        return out.view(bsz, seq, *out.shape[1:]) if packed else out

    def _unfused(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_ref(q, inputs.cos, inputs.sin), apply_rope_ref(k, inputs.cos, inputs.sin)
        if inputs.kv_cache is not None:  # generation: the cache supplies keys, values and the mask
            k_all, v_all = inputs.kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, L, D]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all, attn_mask=inputs.kv_cache.attn_mask,
                                                 enable_gqa=q.shape[2] != k_all.shape[1])
            return out.transpose(1, 2)  # [B, S, Hq, D]
        if inputs.block_mask is not None:
            return flex_document_attention(q, k, v, inputs.block_mask)
        if inputs.cu_seqlens is not None:
            return sdpa_per_document(q, k, v, inputs.cu_seqlens)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _, _, ffn = resolved_dims(cfg)
        self.gate_proj = nn.Linear(cfg.dim, ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed by layer number keeps parameter names stable when parallel code wraps blocks.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Parallel code replaces the fused loss with one that accepts sharded logits (vocab-parallel loss).
        self.fused_loss = True

    # ------------------------------------------------------------------------------------------- init

    def tie_weights(self) -> None:
        """Share the embedding with the output head when configured. `Module.to_empty()` allocates each
        module's parameters separately and so unties them; `init_weights` calls this again."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter (after construction on the meta device and `to_empty`)."""
        self.tie_weights()
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        # Residual-branch outputs shrink with depth (GPT-2, Megatron) so the residual stream's variance stays O(1).
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, out_std if name.endswith(("o_proj", "down_proj")) else std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=gen)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once

    # ------------------------------------------------------------------------------------------- forward

    def attention_inputs(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                         positions: torch.Tensor | None = None, kv_cache: KVCacheLike | None = None) -> AttentionInputs:
        bsz, seq = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(seq, device=device).expand(bsz, seq)
            if doc_ids is not None:
                positions = positions_from_doc_ids(doc_ids)
        _, head_dim, _ = resolved_dims(self.cfg)
        cos, sin = rope_cos_sin(positions, head_dim, self.cfg.rope_theta)
        inputs = AttentionInputs(cos=cos, sin=sin, kv_cache=kv_cache)
        if doc_ids is not None and kv_cache is None:
            if self.cfg.attention == "sdpa" and device.type == "cuda":
                inputs.block_mask = document_block_mask(doc_ids)
            else:  # fused_qknorm_rope (varlen cores), or sdpa off CUDA (per-document SDPA)
                inputs.cu_seqlens, inputs.max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
        return inputs

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, kv_cache: KVCacheLike | None = None) -> torch.Tensor:
        """input_ids [B, S] -> final-norm hidden states [B, S, dim]."""
        inputs = self.attention_inputs(input_ids, doc_ids, positions, kv_cache)
        h = self.embed_tokens(input_ids)
        for block in self.layers.values():
            h = block(h, inputs)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                kv_cache: KVCacheLike | None = None) -> torch.Tensor:
        """Logits [B, S, V] (fp32), or with `labels` [B, S] (-100 = ignored) the mean loss over labelled tokens."""
        h = self.hidden_states(input_ids, doc_ids, positions, kv_cache)
        if labels is None:
            return self.lm_head(h).float()
        if self.fused_loss:
            # Never materialises [B*S, V] logits on the Triton path (see megasynth.kernels.cross_entropy).
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten())
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def check_model_config(cfg: ModelConfig) -> None:
    """The checks a model built in code (without load_config's validation) still needs: a clear ValueError naming
    the field instead of NaN gradients (norm_eps = 0 divides by zero on an all-zero row) or a failure deep in a
    kernel. load_config reports the same problems as ConfigError lines."""
    if not (math.isfinite(cfg.norm_eps) and cfg.norm_eps > 0):
        raise ValueError(f"model.norm_eps must be a finite number > 0, got {cfg.norm_eps}")
    for key, kind in (("attention", AttentionKind), ("attention_core", AttentionCore)):
        allowed, value = get_args(kind), getattr(cfg, key)
        if value not in allowed:
            raise ValueError(f"model.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """The one way to make a model: construct on the meta device (no memory, no init cost), allocate on
    `device`, then `init_weights(seed)`. `seed=None` leaves the storage uninitialised for a caller that
    overwrites every weight next (loading a checkpoint or Hugging Face weights); embeddings are tied either way."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.attention == "fused_qknorm_rope":
        # Look the machine up now: under torch.compile the per-layer core choice then reads a cached dict instead
        # of querying the device (a graph break in every layer of the first trace).
        machine_facts(torch.device(device))
    if seed is None:
        model.tie_weights()  # to_empty unties them
    else:
        model.init_weights(seed)
    return model


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token, Megatron's formula: 3 (fwd + 2x bwd) x 2 (multiply-add) x [matmul terms].

    Matmul terms per token: every projection's weights (q, k, v, o, gate, up, down per layer, and the
    output head), plus attention scores and values, 2 x seq_len x (n_heads x head_dim) per layer, halved when
    causal (a query sees half the keys on average). Norms, RoPE and softmax are not counted.
    """
    n_kv, head_dim, ffn = resolved_dims(cfg)
    q_dim, kv_dim = cfg.n_heads * head_dim, n_kv * head_dim
    per_layer = cfg.dim * q_dim + 2 * cfg.dim * kv_dim + q_dim * cfg.dim + 3 * cfg.dim * ffn
    attention = 2 * seq_len * q_dim * (0.5 if causal else 1.0)
    return 6.0 * (cfg.n_layers * (per_layer + attention) + cfg.dim * cfg.vocab_size)


# ----------------------------------------------------------------------------------------------- documents


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[..., S] segment ids -> bool [..., S], True at the first token of each document (and of each row)."""
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    return is_start


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] non-decreasing segment ids -> position of each token within its document."""
    seq = doc_ids.shape[-1]
    idx = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    start = torch.where(document_starts(doc_ids), idx, torch.zeros_like(idx))
    return idx - torch.cummax(start, dim=-1).values


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, S] -> (int32 cumulative document lengths [N+1] over the flattened B*S tokens, on doc_ids' device;
    the longest document's length). Each row starts a new document, so documents never span two batch rows.
    On CUDA this is the batch's one device-to-host copy (the document starts, B*S bools): the varlen cores need the
    number of documents and max_seqlen on the host, so they are read once here, never per layer."""
    bsz, seq = doc_ids.shape
    starts = torch.nonzero(document_starts(doc_ids).flatten().cpu()).flatten()
    cu = torch.cat([starts, torch.tensor([bsz * seq])]).to(torch.int32)
    max_seqlen = max_seqlen_of(cu)
    # A host-to-device copy from pageable memory is staged at once: no wait for the device's queue.
    return cu.to(doc_ids.device, non_blocking=True), max_seqlen


# ----------------------------------------------------------------------------------------------- document attention


def _compiled(fn):
    """torch.compile(fn), made once per process on first use (wrapping at import would cost every import).
    flex_attention compiled is the fused kernel; uncompiled it materialises the full score matrix, and
    create_block_mask uncompiled evaluates the mask_mod on a dense [B, 1, S, S] grid. Inside a region that is
    already being compiled (parallel.compile compiles each block) fn is traced into that graph as it is."""
    return fn if torch.compiler.is_compiling() else _compile_once(fn)


_compile_once = functools.cache(torch.compile)


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """[B, S] segment ids -> FlexAttention BlockMask: query i sees key j iff j <= i and both lie in the same
    document (torchtitan's document mask). Block-sparse: whole blocks across documents are skipped.

    On CUDA it is built with the compiled create_block_mask, which never materialises the dense mask; eager (CPU
    tests) does, transiently, inside create_block_mask."""
    bsz, seq = doc_ids.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    make = _compiled(create_block_mask) if doc_ids.is_cuda else create_block_mask
    return make(document_causal, bsz, None, seq, seq, device=doc_ids.device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hkv divides Hq) -> [B, S, Hq, D]: softmax attention under the block
    mask, scale 1/sqrt(D). Compiled flex_attention on CUDA; eager elsewhere (forward only: PyTorch has no CPU
    backward for FlexAttention, which is why the model uses sdpa_per_document off CUDA)."""
    attend = _compiled(flex_attention) if q.is_cuda else flex_attention
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                 enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@torch.compiler.disable  # document boundaries are host values that change every batch: compiled, each would recompile
def sdpa_per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D], cu_seqlens int32 [N+1] over the flattened B*S tokens -> [B, S, Hq, D]:
    causal SDPA on each document separately. The document path off CUDA: memory linear in S (no [S, S] mask),
    one SDPA call per document (cu_seqlens is a CPU tensor there, so reading it costs no sync)."""
    bsz, seq = q.shape[:2]
    bounds = cu_seqlens.tolist()
    flat = [t.flatten(0, 1) for t in (q, k, v)]  # [B*S, H, D]
    gqa = q.shape[2] != k.shape[2]
    outs = []
    for start, end in itertools.pairwise(bounds):
        qd, kd, vd = (t[start:end].transpose(0, 1)[None] for t in flat)  # [1, H, L, D]
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1))
    if not outs:
        return torch.zeros_like(q)
    return torch.cat(outs).view(bsz, seq, *q.shape[2:])
