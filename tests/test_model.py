"""The decoder: shapes, causality, QK-norm placement, per-document masking, init, FLOPs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask

from megasynth.config import ConfigError, ModelConfig, load_config
from megasynth.model import (
    Transformer,
    build_model,
    cu_seqlens_from_doc_ids,
    document_block_mask,
    flex_document_attention,
    flops_per_token,
    positions_from_doc_ids,
    resolved_dims,
)
from megasynth.train import main as train_main


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, rope_theta=10000.0)
    base.update(overrides)
    return ModelConfig(**base)


# The Triton-path tests run the compiled kernels on a GPU machine and the interpreter elsewhere (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's fp32 tl.dot uses TF32 on CUDA (10-bit mantissa): ~1e-3 relative per product there, fp32 rounding on CPU.
LOSS_TOL = {"rtol": 5e-3, "atol": 1e-5} if DEVICE.type == "cuda" else {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 5e-2, "atol": 1e-4} if DEVICE.type == "cuda" else {"rtol": 1e-4, "atol": 1e-6}


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> Transformer:
    model = build_model(cfg, device, seed=seed)
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


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_backends_agree_on_loss_and_gradients(kernels, monkeypatch):
    """The `fused_qknorm_rope` backend (megasynth.kernels.qknorm_rope_attention: QK-norm + RoPE pre-pass, then the
    attention core; varlen over documents) against the `sdpa` backend run on the PyTorch reference kernels, with and without
    per-document masking. kernels=triton runs every Triton kernel of the model (pre-pass, flash core, RMSNorm,
    SwiGLU, fused linear cross-entropy) under the interpreter; kernels=reference runs the composite's dense-mask
    reference. Tiny on purpose: the interpreter is slow (2 layers, 12 tokens). On a GPU machine the same test runs
    the compiled kernels, and the sdpa side takes the FlexAttention document path."""
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    doc_ids = torch.tensor([[0] * 4 + [1] * 1 + [2] * 8, [0] * 13], device=DEVICE)
    ref_model = build(tiny_cfg(attention="sdpa"), seed=2, device=DEVICE)
    model = build(tiny_cfg(attention="fused_qknorm_rope"), seed=2, device=DEVICE)
    for docs in (None, doc_ids[:, :-1]):
        ref_model.zero_grad()
        model.zero_grad()
        # The kernel mode is read at each call and autograd replays the forward's choice, so one model per mode.
        monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
        ref_loss = ref_model(ids[:, :-1], labels=ids[:, 1:], doc_ids=docs)
        ref_loss.backward()
        monkeypatch.setenv("MEGASYNTH_KERNELS", kernels)
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_ids=docs)
        loss.backward()
        # fp32 on both sides with different op orders (tiled online softmax, fused norms and loss vs PyTorch ops):
        # on the CPU rounding-level differences (measured <= 1e-6 relative to each gradient's largest entry).
        torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL, msg=name)


def test_loss_ignores_minus_100_labels_and_matches_cross_entropy(monkeypatch):
    """The model's loss is the fused linear cross-entropy (Triton, under the interpreter here); it must equal
    float64 cross-entropy over the reference path's logits, skip -100 labels, and give the same gradients."""
    cfg = tiny_cfg(n_layers=1)
    model = build(cfg, seed=4, device=DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, 10), device=DEVICE)
    labels = torch.randint(0, cfg.vocab_size, (2, 10), device=DEVICE)
    labels[0, :4] = -100
    monkeypatch.setenv("MEGASYNTH_KERNELS", "reference")
    logits = model(ids)
    expected = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setenv("MEGASYNTH_KERNELS", "triton")
    loss = model(ids, labels=labels)
    loss.backward()
    # fp32 loss (logsumexp over 101 logits) against float64 over the same logits: a few ulps of fp32 on the CPU.
    torch.testing.assert_close(loss.double(), expected, **LOSS_TOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name].float(), **GRAD_TOL, msg=name)
    # Changing an ignored position's label changes nothing.
    labels[0, :4] = 0
    assert not torch.allclose(model(ids, labels=labels), loss)


def _document_causal_mask_ref(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, 1, S, S] bool, the dense mask the model used to build: query i sees key j iff j <= i and
    both lie in the same document. Test-only reference."""
    seq = doc_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def _attention_ref(q, k, v, mask):
    """float64 softmax attention: q [B, S, Hq, D], k/v [B, S, Hkv, D], mask [B, 1, S, S] -> [B, S, Hq, D]."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


DOCS = torch.tensor([[0] * 5 + [1] * 1 + [2] * 12 + [3] * 6, [0] * 17 + [1] * 7])  # [2, 24]


def test_sdpa_document_masking_matches_the_dense_mask_without_building_one():
    """One sdpa attention layer with documents against float64 dense-mask math (the old document_causal_mask,
    positions restarting per document), forward and gradients; the per-forward state carries no [B, 1, S, S]
    tensor (off CUDA: cu_seqlens; on CUDA: a FlexAttention BlockMask, checked in the next test)."""
    cfg = tiny_cfg(n_layers=1, dim=32, n_heads=4, n_kv_heads=2)  # head_dim 8, GQA 2
    model = build(cfg, seed=5).double()
    attn = model.layers["0"].self_attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    bsz, seq = DOCS.shape
    inputs = model.attention_inputs(torch.zeros(bsz, seq, dtype=torch.long), doc_ids=DOCS)
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if isinstance(value, torch.Tensor):
            assert value.numel() < bsz * seq * seq, f"{f.name} has {tuple(value.shape)}: a dense mask?"
    assert inputs.block_mask is None and inputs.max_seqlen == 17
    assert inputs.cu_seqlens.tolist() == [0, 5, 6, 18, 24, 41, 48]

    x = torch.randn(bsz, seq, cfg.dim, dtype=torch.float64, requires_grad=True)
    ours = attn(x, inputs)
    n_kv, hd, _ = resolved_dims(cfg)
    pos = positions_from_doc_ids(DOCS)
    q = (x @ attn.q_proj.weight.T).view(bsz, seq, cfg.n_heads, hd)
    k = (x @ attn.k_proj.weight.T).view(bsz, seq, n_kv, hd)
    v = (x @ attn.v_proj.weight.T).view(bsz, seq, n_kv, hd)
    q = torch.stack([_rope(_rms(q[b], attn.q_norm.weight, cfg.norm_eps), pos[b], cfg.rope_theta) for b in range(bsz)])
    k = torch.stack([_rope(_rms(k[b], attn.k_norm.weight, cfg.norm_eps), pos[b], cfg.rope_theta) for b in range(bsz)])
    ref = _attention_ref(q, k, v, _document_causal_mask_ref(DOCS)).reshape(bsz, seq, -1) @ attn.o_proj.weight.T
    # float64 both sides; RoPE tables are fp32 in the model (rope_cos_sin): ~1e-7 relative.
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    (got,) = torch.autograd.grad(ours, x, g)
    (want,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_block_mask_matches_the_dense_mask():
    """The CUDA document path, run eagerly on the CPU (forward only: PyTorch has no CPU backward for
    FlexAttention): the BlockMask's mask_mod is exactly the dense document-causal mask, and flex attention under
    it (GQA through enable_gqa) equals float64 dense-mask attention."""
    bsz, seq = DOCS.shape
    block_mask = document_block_mask(DOCS)
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (bsz, 1, seq, seq)
    dense = create_mask(block_mask.mask_mod, bsz, 1, seq, seq, device="cpu")
    assert torch.equal(dense, _document_causal_mask_ref(DOCS))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, seq, 4, 16, generator=gen)
    k, v = torch.randn(2, bsz, seq, 2, 16, generator=gen)
    with torch.no_grad():
        out = flex_document_attention(q, k, v, block_mask)
    want = _attention_ref(q.double(), k.double(), v.double(), _document_causal_mask_ref(DOCS))
    # fp32 flex against float64: ~1e-7 relative rounding on O(1) values.
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_norm_eps_must_be_positive(capsys):
    """eps = 0 would divide by zero on an all-zero row (NaN gradients): refused by the config (one
    line naming the field, exit code 2 from the command line) and by a model built in code."""
    with pytest.raises(ConfigError, match=r"^model.norm_eps must be a finite number > 0, got 0.0$"):
        load_config(None, ["--model.norm_eps=0"])
    assert train_main(["--model.norm_eps=-1e-6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.norm_eps must be a finite number > 0, got -1e-06"]
    with pytest.raises(ValueError, match="model.norm_eps must be a finite number > 0, got 0.0"):
        build_model(tiny_cfg(norm_eps=0.0))


def test_attention_core_is_validated():
    fused = "--model.attention=fused_qknorm_rope"
    assert load_config(None, [fused, "--model.attention_core=flash_attn"]).model.attention_core == "flash_attn"
    with pytest.raises(ConfigError, match=r"model.attention_core: expected one of 'auto', 'flash_attn', 'cudnn', 'flash', 'triton', 'reference', got 'fa3'"):
        load_config(None, ["--model.attention_core=fa3"])
    # The SDPA cores take batched inputs only; document masking needs a varlen core.
    with pytest.raises(ConfigError, match=r"model.attention_core='cudnn' \(torch SDPA\) takes batched inputs only"):
        load_config(None, [fused, "--model.attention_core=cudnn"])
    cfg = load_config(None, [fused, "--model.attention_core=cudnn", "--data.document_masking=false"])
    assert cfg.model.attention_core == "cudnn"
    with pytest.raises(ValueError, match="model.attention_core must be one of 'auto', .*got 'fa3'"):
        build_model(tiny_cfg(attention_core="fa3"))
    # A model built in code (no load_config) names the current values; the old name is for saved configs.
    with pytest.raises(ValueError, match="model.attention must be one of 'sdpa', 'fused_qknorm_rope', got 'triton'"):
        build_model(tiny_cfg(attention="triton"))


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
    cu, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 7, 8, 10, 12]
    assert max_seqlen == 3
    # The fused backend gets both, computed once per forward for every layer.
    inputs = build(tiny_cfg(attention="fused_qknorm_rope")).attention_inputs(torch.zeros(2, 6, dtype=torch.long), doc_ids)
    assert inputs.cu_seqlens.tolist() == cu.tolist() and inputs.max_seqlen == 3 and inputs.block_mask is None


def test_flops_per_token_megatron_formula():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
    seq = 32
    # By hand: q 64x64, k and v 64x32 each, o 64x64, MLP 3 x 64x128, per layer; head 64x1000.
    matmul_params = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 1000
    attention = 2 * (2 * seq * 64) / 2  # QK^T and PV, seq keys of width 64 per layer, halved when causal
    assert flops_per_token(cfg, seq) == 6 * (matmul_params + attention)
    assert flops_per_token(cfg, seq, causal=False) == 6 * (matmul_params + 2 * attention)
