"""The Llama-3 decoder with QK-norm (exactly Hugging Face's Qwen3ForCausalLM layout). No parallel code here.

    model = build_model(cfg.model, device="cuda", seed=0)       # meta-device construction, then init
    loss = model(input_ids, labels=labels, doc_ids=doc_ids)      # [B, S] -> scalar mean loss
    logits = model(input_ids)                                    # [B, S] -> [B, S, V]

Parameter names follow Qwen3 minus the leading `model.` (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, norm, lm_head), so
exporting to Hugging Face is a renaming. Attention is a switch: `sdpa` runs QK-norm, RoPE and PyTorch's
scaled_dot_product_attention as separate ops; `triton` runs the fused kernel from megasynth.kernels.

Documents: `doc_ids` [B, S] (non-decreasing per row, from the sample index) make attention block-diagonal per
document and restart positions at each document start. A KV cache (see megasynth.generate) plugs into
`forward(..., kv_cache=...)`: it stores each layer's keys and values and supplies the attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megasynth.config import ModelConfig
from megasynth.kernels import linear_cross_entropy, qknorm_rope_attention, rms_norm, rope_cos_sin, swiglu
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
    """Per-forward attention state, computed once and shared by every layer."""

    cos: torch.Tensor  # [B, S, D/2] fp32, per token (positions may restart per document)
    sin: torch.Tensor
    sdpa_mask: torch.Tensor | None = None  # [B, 1, S, S] bool, None = plain causal
    cu_seqlens: torch.Tensor | None = None  # int32 [N+1] over the flattened B*S tokens (triton backend)
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
        self.backend = cfg.attention
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * head_dim, cfg.dim, bias=False)
        # QK-norm: one weight of size head_dim shared by all heads (Qwen3), applied before RoPE.
        self.q_norm = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.eps = cfg.norm_eps

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism the projections are sharded and each rank holds a subset of heads.
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        if self.backend == "triton" and inputs.kv_cache is None:
            out = self._fused(q, k, v, inputs)
        else:
            out = self._unfused(q, k, v, inputs)
        return self.o_proj(out.reshape(bsz, seq, -1))

    def _fused(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seq = q.shape[:2]
        if inputs.cu_seqlens is None:
            return qknorm_rope_attention(q, k, v, self.q_norm.weight, self.k_norm.weight, inputs.cos, inputs.sin, eps=self.eps)
        out = qknorm_rope_attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), self.q_norm.weight, self.k_norm.weight,
            inputs.cos.flatten(0, 1), inputs.sin.flatten(0, 1),
            cu_seqlens=inputs.cu_seqlens, eps=self.eps,
        )
        return out.view(bsz, seq, *out.shape[1:])

    def _unfused(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_ref(q, inputs.cos, inputs.sin), apply_rope_ref(k, inputs.cos, inputs.sin)
        if inputs.kv_cache is not None:
            k_all, v_all = inputs.kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, L, D]
            mask, causal = inputs.kv_cache.attn_mask, False
        else:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
            mask, causal = inputs.sdpa_mask, inputs.sdpa_mask is None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all, v_all, attn_mask=mask, is_causal=causal,
            enable_gqa=q.shape[2] != k_all.shape[1],
        )
        return out.transpose(1, 2)  # [B, S, Hq, D]


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

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------- forward

    def attention_inputs(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> AttentionInputs:
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
            if self.cfg.attention == "triton":
                inputs.cu_seqlens = cu_seqlens_from_doc_ids(doc_ids)
            else:
                inputs.sdpa_mask = document_causal_mask(doc_ids)
        return inputs

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S] -> final-norm hidden states [B, S, dim]."""
        inputs = self.attention_inputs(input_ids, doc_ids, positions, kv_cache)
        h = self.embed_tokens(input_ids)
        for block in self.layers.values():
            h = block(h, inputs)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] (fp32), or with `labels` [B, S] (-100 = ignored) the mean loss over labelled tokens."""
        h = self.hidden_states(input_ids, doc_ids, positions, kv_cache)
        if labels is None:
            return self.lm_head(h).float()
        if self.fused_loss:
            # Never materialises [B*S, V] logits on the Triton path (see megasynth.kernels.cross_entropy).
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten())
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------------------------------- FLOPs


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """The one way to make a model: construct on the meta device (no memory, no init cost), allocate on
    `device`, then `init_weights(seed)`. `seed=None` leaves the storage uninitialised for a caller that
    overwrites every weight next (loading a checkpoint or Hugging Face weights); embeddings are tied either way."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
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


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, 1, S, S] bool: query i sees key j iff j <= i and both lie in the same document."""
    seq = doc_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> int32 cumulative document lengths over the flattened B*S tokens. (No max_seqlen: the fused
    kernel bounds its tile schedule on the host without it, so computing it would only add a device sync.)

    Each row starts a new document, so documents never span two batch rows.
    """
    bsz, seq = doc_ids.shape
    starts = torch.nonzero(document_starts(doc_ids).flatten(), as_tuple=False).flatten()
    total = torch.tensor([bsz * seq], device=doc_ids.device)
    return torch.cat([starts, total]).to(torch.int32)
