"""Hugging Face interop: logit parity with transformers both ways, weight round trips, clear errors, the CLIs."""

import json

import pytest
import torch
import transformers
from bert_tokenizer import MAX_LENGTH, reference_ids, write_bert_checkpoint
from helpers import load_tool
from safetensors.torch import load_file, save_file

from megasynth.chat import IM_END, TRAINING_SPECIAL_TOKENS
from megasynth.checkpoint import load_for_inference, save_model_checkpoint
from megasynth.config import ModelConfig
from megasynth.hf import (
    HFError,
    config_for_model,
    export_hf,
    import_hf,
    model_config_from_hf,
    read_safetensors,
    write_safetensors,
)
from megasynth.model import Transformer, build_model
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer

transformers.logging.set_verbosity_error()



# fp32 both sides; the only differences are summation orders and RoPE tables (ours float64-rounded, HF fp32
# products): measured <= 6e-6 on logits of magnitude ~4 at 200 tokens, so 1e-4 (the bar) has margin.
PARITY_ATOL = 1e-4
SEQ = 200


def build_ours(qk_norm=True, tie=False, seed=0) -> Transformer:
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=96,
                      max_seq_len=256, rope_theta=10000.0, qk_norm=qk_norm, tie_embeddings=tie, init_std=0.1)
    model = build_model(cfg, "cpu", seed=seed)
    with torch.no_grad():  # norms away from 1, so a missing or misplaced norm weight changes the logits
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_ids(seed=1, batch=2):
    return torch.randint(0, 300, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qk_norm, tie", [(True, False), (False, True)])
def test_export_loads_in_transformers_with_matching_logits(tmp_path, qk_norm, tie):
    ours = build_ours(qk_norm, tie)
    out = export_hf(ours, config_for_model(ours.cfg), tmp_path / "hf", bos_id=None, eos_id=0)
    hf_cfg = json.loads((out / "config.json").read_text())
    arch = "Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"
    assert hf_cfg["architectures"] == [arch] and hf_cfg["tie_word_embeddings"] is tie
    assert hf_cfg["head_dim"] == 32 and hf_cfg["num_key_value_heads"] == 2 and hf_cfg["eos_token_id"] == 0
    assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) is not tie
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == arch
    ids = random_ids()
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < PARITY_ATOL


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_transformers_random_model_imports_with_matching_logits(tmp_path, kind):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=kind == "llama")
    if kind == "qwen3":
        config = transformers.Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        theirs = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
        theirs = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:  # HF initialises norms to 1; perturb them so their mapping is tested
                p.add_(0.3 * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path / "hf")
    ours, cfg = import_hf(tmp_path / "hf")
    assert cfg.model.qk_norm is (kind == "qwen3") and cfg.model.head_dim == 16 and cfg.model.norm_eps == 1e-5
    assert cfg.model.rope_theta == (1e6 if kind == "qwen3" else 5e5)
    ids = random_ids(seed=2)
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < PARITY_ATOL


def test_round_trip_through_the_clis_keeps_every_weight_and_the_tokenizer(tmp_path):
    export_tool, import_tool = load_tool("export_hf"), load_tool("import_hf")
    ours = build_ours(qk_norm=True, tie=True, seed=4)
    tok = train_bpe_tokenizer(["hello world, the tiny corpus says hello"] * 20, tmp_path / "tok", vocab_size=290)
    ckpt = tmp_path / "ckpt"
    save_model_checkpoint(ours, config_for_model(ours.cfg), ckpt)
    tok.save(ckpt / "tokenizer")
    assert export_tool.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("hello world", add_special_tokens=False) == tok.encode("hello world")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == tok.eod_id
    assert import_tool.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    back, cfg = load_for_inference(tmp_path / "back")
    assert cfg.model == ours.cfg
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").is_file()
    # Every exported file has one mode (safetensors alone used to make its file 0600): a serving user reads all.
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044 == 0o044, modes
    # An existing output is refused (exit 2, before the import), not overwritten silently.
    with pytest.raises(SystemExit) as exc:
        import_tool.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")])
    assert exc.value.code == 2


def test_sharded_safetensors_round_trip(tmp_path):
    ours = build_ours()
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    files = write_safetensors(tensors, tmp_path, max_shard_bytes=900)  # 400 bytes each: two per shard
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    back = read_safetensors(tmp_path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    out = export_hf(ours, config_for_model(ours.cfg), tmp_path / "hf", max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    again, _ = import_hf(out)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def _qwen3_dir(tmp_path):
    ours = build_ours()
    return export_hf(ours, config_for_model(ours.cfg), tmp_path / "hf")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_type 'llama3'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": "64"}, '"hidden_size" must be int'),
])
def test_unsupported_configs_are_named(tmp_path, changes, message):
    hf = _qwen3_dir(tmp_path)
    _edit_config(hf, **changes)
    with pytest.raises(HFError, match=message):
        import_hf(hf)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    hf = _qwen3_dir(tmp_path)
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(tensors, str(hf / "model.safetensors"))
    with pytest.raises(HFError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_norm\.weight; "
                                      r"unexpected tensors: model\.layers\.2\.mlp\.up_proj\.weight"):
        import_hf(hf)
    tensors = load_file(str(_qwen3_dir(tmp_path / "b") / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, str(tmp_path / "b" / "hf" / "model.safetensors"))
    with pytest.raises(HFError, match=r"model\.norm\.weight has shape \(63,\), the config implies \(64,\)"):
        import_hf(tmp_path / "b" / "hf")


def test_llama_without_head_dim_uses_hidden_over_heads():
    cfg = model_config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128,
                                "head_dim": None, "rope_theta": 10000.0})
    assert cfg.head_dim == 16 and cfg.n_kv_heads == 4 and not cfg.qk_norm and cfg.rope_theta == 10000.0


def test_a_chat_tokenizer_exports_its_end_of_turn_as_a_stop_id(tmp_path):
    # An engine serving the export stops where tools/generate.py --chat does: at EOD, and at <|im_end|> when the
    # tokenizer keeps it as one token (tests/vllm_engine checks a real vLLM stops there); config.json keeps EOD.
    ours = build_ours(seed=5)
    texts = ["hello world, the tiny corpus says hello"] * 20
    chat_tok = train_bpe_tokenizer(texts, tmp_path / "chat_tok", vocab_size=290,
                                   special_tokens=TRAINING_SPECIAL_TOKENS)
    plain_tok = train_bpe_tokenizer(texts, tmp_path / "plain_tok", vocab_size=290)
    im_end = chat_tok.encode(IM_END, parse_special=True)
    assert len(im_end) == 1 and im_end[0] != chat_tok.eod_id
    for name, tok, expected in (("chat", chat_tok, [chat_tok.eod_id, im_end[0]]), ("plain", plain_tok, plain_tok.eod_id)):
        out = export_hf(ours, config_for_model(ours.cfg), tmp_path / f"hf_{name}", tokenizer=tok)
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == expected
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eod_id


def test_export_cli_errors_exit_2(tmp_path, capsys):
    assert load_tool("export_hf").main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    ours = build_ours()
    save_model_checkpoint(ours, config_for_model(ours.cfg), tmp_path / "ckpt")
    # No tokenizer anywhere: a clear error unless --no-tokenizer.
    assert load_tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    assert "pass --tokenizer DIR, or --no-tokenizer" in capsys.readouterr().err
    assert load_tool("export_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                                        "--no-tokenizer", "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_export_drops_truncation_and_padding_from_the_tokenizer(tmp_path):
    """A tokenizer.json with truncation/padding saved in it must not reach the export with them: transformers
    (and vLLM) would cut and pad every prompt of the exported model."""
    ckpt, _ = write_bert_checkpoint(tmp_path)
    model, cfg = load_for_inference(ckpt)
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer=load_tokenizer(ckpt / "tokenizer"))
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    text = " ".join(["the module provides functions"] * 10)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > MAX_LENGTH and ids == reference_ids(ckpt / "tokenizer", text)
