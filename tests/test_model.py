"""The decoder: shapes, causality, QK-norm placement, per-document masking, init, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from megasynth.config import ModelConfig
from megasynth.model import (
    Transformer,
    build_model,
    cu_seqlens_from_doc_ids,
    document_causal_mask,
    flops_per_token,
    positions_from_doc_ids,
    resolved_dims,
)


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, rope_theta=10000.0)
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    model = build_model(cfg, "cpu", seed=seed)
    return model.to(dtype)


def test_shapes_and_parameter_names_follow_qwen3():
    cfg = tiny_cfg()
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    assert model(ids).shape == (3, 11, cfg.vocab_size)
    names = set(dict(model.named_parameters()))
    for expected in (
        "embed_tokens.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight",
        "layers.0.self_attn.o_proj.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.0.self_attn.k_norm.weight",
        "layers.1.mlp.gate_proj.weight",
        "layers.1.mlp.up_proj.weight",
        "layers.1.mlp.down_proj.weight",
        "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.weight",
        "norm.weight",
        "lm_head.weight",
    ):
        assert expected in names, expected
    n_kv, head_dim, ffn = resolved_dims(cfg)
    assert model.layers["0"].self_attn.k_proj.weight.shape == (n_kv * head_dim, cfg.dim)
    assert model.layers["0"].self_attn.q_norm.weight.shape == (head_dim,)
    assert model.layers["0"].mlp.gate_proj.weight.shape == (ffn, cfg.dim)


def test_default_dimension_rules():
    cfg = ModelConfig(dim=4096, n_heads=32, n_kv_heads=0, head_dim=0, ffn_dim=0)
    n_kv, head_dim, ffn = resolved_dims(cfg)
    assert (n_kv, head_dim) == (32, 128)
    assert ffn == 11008  # Llama-2 7B's rule: 8/3 * 4096 = 10922.67 rounded up to a multiple of 256


def test_tied_embeddings_share_storage():
    model = build(tiny_cfg(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = build(tiny_cfg(tie_embeddings=False))
    assert model.num_params() == untied.num_params() - untied.lm_head.weight.numel()


def test_causality_future_tokens_do_not_change_earlier_logits():
    cfg = tiny_cfg()
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, cfg.vocab_size, (2, 7))
    a, b = model(ids), model(changed)
    # fp32, identical computations on identical prefixes: differences are summation-order noise only.
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-5)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]  # [S, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_attention_block_matches_hand_written_qknorm_reference():
    """One attention layer against a from-scratch float64 implementation: project, QK-norm per head over
    head_dim (shared weight), THEN RoPE, then causal softmax attention with GQA, then the output projection."""
    cfg = tiny_cfg(n_layers=1)
    model = build(cfg, seed=3).double()
    attn = model.layers["0"].self_attn
    with torch.no_grad():  # non-trivial norm weights so a misplaced or missing norm shows
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    n_kv, hd, _ = resolved_dims(cfg)
    seq = 12
    x = torch.randn(1, seq, cfg.dim, dtype=torch.float64)
    inputs = model.attention_inputs(torch.zeros(1, seq, dtype=torch.long))
    ours = attn(x, inputs)

    pos = torch.arange(seq)
    q = (x[0] @ attn.q_proj.weight.T).view(seq, cfg.n_heads, hd)
    k = (x[0] @ attn.k_proj.weight.T).view(seq, n_kv, hd)
    v = (x[0] @ attn.v_proj.weight.T).view(seq, n_kv, hd)
    q = _rope(_rms(q, attn.q_norm.weight, cfg.norm_eps), pos, cfg.rope_theta)
    k = _rope(_rms(k, attn.k_norm.weight, cfg.norm_eps), pos, cfg.rope_theta)
    group = cfg.n_heads // n_kv
    out = torch.empty(seq, cfg.n_heads, hd, dtype=torch.float64)
    for h in range(cfg.n_heads):
        scores = q[:, h] @ k[:, h // group].T / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, h // group]
    ref = out.reshape(seq, -1) @ attn.o_proj.weight.T
    # float64 on both sides; RoPE tables are rounded to fp32 in the model (rope_cos_sin), which bounds the
    # agreement at ~1e-7 relative on O(1) activations.
    torch.testing.assert_close(ours[0], ref, rtol=1e-6, atol=1e-6)

    # The same reference with RoPE applied BEFORE the norm must disagree: the test can tell the placements apart.
    q_wrong = _rms(_rope((x[0] @ attn.q_proj.weight.T).view(seq, cfg.n_heads, hd), pos, cfg.rope_theta), attn.q_norm.weight, cfg.norm_eps)
    assert (q_wrong - q).abs().max() > 1e-3


def test_document_masking_equals_separate_sequences():
    cfg = tiny_cfg()
    model = build(cfg, seed=1)
    lengths = [5, 1, 10]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = model(ids, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n])
        # Same math per document (block-diagonal mask + positions restarting at 0); fp32 reduction order differs.
        torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    # Without doc_ids the later documents see earlier ones and the logits differ.
    assert (model(ids)[:, 6:] - packed[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree_on_loss_and_gradients(backend, monkeypatch):
    """`triton` routes attention through megasynth.kernels.qknorm_rope_attention (the reference on CPU);
    loss and gradients must equal the `sdpa` path, with and without per-document masking."""
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    ref_model = build(tiny_cfg(attention="sdpa"), seed=2)
    model = build(tiny_cfg(attention=backend), seed=2)
    ids = torch.randint(0, 101, (2, 13))
    doc_ids = torch.tensor([[0] * 4 + [1] * 9, [0] * 13])
    for docs in (None, doc_ids):
        ref_model.zero_grad()
        model.zero_grad()
        ref_loss = ref_model(ids[:, :-1], labels=ids[:, 1:], doc_ids=None if docs is None else docs[:, :-1])
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_ids=None if docs is None else docs[:, :-1])
        ref_loss.backward()
        loss.backward()
        # fp32, different but equivalent op orders (fused kernel reference vs SDPA): 1e-5 relative.
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_ignores_minus_100_labels_and_matches_cross_entropy():
    cfg = tiny_cfg()
    model = build(cfg, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    labels = torch.randint(0, cfg.vocab_size, (2, 10))
    labels[0, :4] = -100
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels=labels), expected, rtol=1e-5, atol=1e-6)


def test_init_weights_is_seeded_and_scales_output_projections():
    cfg = tiny_cfg(n_layers=8, dim=256, n_heads=4, n_kv_heads=4, ffn_dim=512)
    a, b, c = build(cfg, seed=7), build(cfg, seed=7), build(cfg, seed=8)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.dim() == 2:
            assert not torch.equal(p, r), name
    std = cfg.init_std
    # 256*256 samples: the sample std is within ~1% of the true one.
    assert abs(a.layers["0"].self_attn.q_proj.weight.std().item() - std) < 0.05 * std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    assert abs(a.layers["0"].self_attn.o_proj.weight.std().item() - out_std) < 0.05 * out_std
    assert torch.equal(a.norm.weight, torch.ones(cfg.dim))


def test_doc_helpers():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 3, 3]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 0, 1]]
    mask = document_causal_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    cu = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 7, 8, 10, 12]
    assert (cu[1:] - cu[:-1]).max().item() == 3


def test_flops_per_token_megatron_formula():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
    seq = 32
    # By hand: q 64x64, k and v 64x32 each, o 64x64, MLP 3 x 64x128, per layer; head 64x1000.
    matmul_params = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 1000
    attention = 2 * (2 * seq * 64) / 2  # QK^T and PV, seq keys of width 64 per layer, halved when causal
    assert flops_per_token(cfg, seq) == 6 * (matmul_params + attention)
    assert flops_per_token(cfg, seq, causal=False) == 6 * (matmul_params + 2 * attention)
