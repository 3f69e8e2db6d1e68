"""Hugging Face interop: our checkpoints <-> transformers' Qwen3ForCausalLM / LlamaForCausalLM directories.

    export_hf(model, cfg, "out/hf", tokenizer=tok)      # then transformers.AutoModelForCausalLM.from_pretrained
    model, cfg = import_hf("Qwen/Qwen3-0.6B-local")      # a local HF directory -> our Transformer + Config

The name mapping and what an import refuses: docs/training.md ("Hugging Face interop").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from megasynth.chat import ChatTemplateError, load_chat_template
from megasynth.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from megasynth.io import atomic_files, atomic_write_json, owned_names
from megasynth.model import Transformer, build_model, resolved_dims
from megasynth.tokenizer import HF_FILE, SP_FILE, TOKENIZER_FILES, load_tokenizer

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What export_hf owns in its directory (megasynth.io.atomic_files: config.json, the file transformers reads first,
# is published last), and what --overwrite replaces: the weights in either layout, the configs, and the tokenizer
# files (megasynth.tokenizer.TOKENIZER_FILES: Tokenizer.save writes some of them, and a stale one of the others,
# such as a chat_template.jinja, would shadow what the export wrote). Anything else (a README, a model card) is
# left alone.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                SAFETENSORS_INDEX, *TOKENIZER_FILES)
# What import_hf_checkpoint owns: a weights-only checkpoint (megasynth.checkpoint: DCP shards and .metadata,
# config.toml, meta.json with every file's checksum, published last) and its tokenizer/ directory.
IMPORT_FILES = ("meta.json", "config.toml", ".metadata", "*.distcp", "tokenizer")
# Buffers some older checkpoints store; recomputed by transformers and by us, never weights.
_IGNORED_HF = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class HFError(ValueError):
    """An HF directory we cannot read or convert; the message names the file and the field or tensor."""


# ------------------------------------------------------------------------------------------- names


def to_hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face name (lm_head stays, everything else gains "model.")."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# ------------------------------------------------------------------------------------------- configs


def hf_config(mcfg: ModelConfig, *, dtype: torch.dtype = torch.float32, bos_id: int | None = None,
              eos_id: int | None = None) -> dict:
    """config.json for our model config: Qwen3 when qk_norm, else Llama."""
    n_kv, head_dim, ffn = resolved_dims(mcfg)
    arch = "Qwen3ForCausalLM" if mcfg.qk_norm else "LlamaForCausalLM"
    dtype_name = str(dtype).removeprefix("torch.")
    out = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": mcfg.vocab_size,
        "hidden_size": mcfg.dim,
        "intermediate_size": ffn,
        "num_hidden_layers": mcfg.n_layers,
        "num_attention_heads": mcfg.n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": mcfg.norm_eps,
        "max_position_embeddings": mcfg.max_seq_len,
        # transformers >= 5 reads rope_parameters, older versions and vLLM read rope_theta: write both.
        "rope_theta": mcfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": mcfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": mcfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype_name,  # the pre-5 name of "dtype"
        "dtype": dtype_name,
    }
    if arch == "Qwen3ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=mcfg.n_layers,
                   layer_types=["full_attention"] * mcfg.n_layers)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


def _field(hf: dict, key: str, source: str, kind: type | tuple = int, default=None):
    value = hf.get(key)
    value = default if value is None else value
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise HFError(f"{source}: field \"{key}\" must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _rope_theta(hf: dict, source: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, table in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(table, dict):
            raise HFError(f"{source}: field \"{name}\" must be an object, got {table!r}")
        kind = table.get("rope_type", table.get("type", "default"))
        if kind != "default":
            raise HFError(f"{source}: field \"{name}\" asks for rope_type {kind!r}; only plain RoPE (\"default\") is "
                          "supported: megasynth's model has no RoPE scaling (Llama 3.1+ and long-context variants)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise HFError(f"{source}: field \"rope_theta\" must be a positive number, got {theta!r}")
    return float(theta)


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Qwen3 or Llama config.json; anything we cannot represent is an error naming it."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch is None:
        arch = {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise HFError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                      f"supported: {', '.join(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{source}: field \"hidden_act\" is {hf['hidden_act']!r}; only \"silu\" (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise HFError(f"{source}: field \"{key}\" is true; megasynth's model has no biases or sliding window")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise HFError(f"{source}: field \"layer_types\" has {sorted(set(layer_types))}; "
                      "only full_attention is supported")
    dim = _field(hf, "hidden_size", source)
    n_heads = _field(hf, "num_attention_heads", source)
    return ModelConfig(
        vocab_size=_field(hf, "vocab_size", source),
        dim=dim,
        n_layers=_field(hf, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=_field(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=_field(hf, "head_dim", source, default=dim // n_heads if n_heads else 0),
        ffn_dim=_field(hf, "intermediate_size", source),
        norm_eps=float(_field(hf, "rms_norm_eps", source, (int, float), 1e-6)),
        rope_theta=_rope_theta(hf, source),
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=_field(hf, "max_position_embeddings", source, default=4096),
        init_std=float(_field(hf, "initializer_range", source, (int, float), 0.02)),
    )


def config_for_model(mcfg: ModelConfig) -> Config:
    """A full Config around an imported model section (other sections at their defaults), validated."""
    table = {"model": config_to_dict(Config(model=mcfg))["model"]}
    table["data"] = {"seq_len": min(1024, mcfg.max_seq_len)}
    try:
        return config_from_dict(table)
    except ConfigError as e:
        raise HFError(f"the converted model config is invalid: {e}") from None


# ------------------------------------------------------------------------------------------- tensors


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, contiguous, in `dtype`; no lm_head when tied."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out[to_hf_name(name)] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return out


def _save_shard(save_file, tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors creates its file with mode 0600; give it the mode every other file of the export gets (0666
    # less the umask), so a model directory shared with a serving user (vLLM) is readable as a whole.
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards plus the index json; returns file names."""
    from safetensors.torch import save_file  # noqa: PLC0415

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save_shard(save_file, shards[0], directory / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        _save_shard(save_file, shard, directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX]


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards listed by model.safetensors.index.json."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index}: field \"weight_map\" must be a non-empty object")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in hf_dir.glob("*.bin"))) or "none"
        raise HFError(f"{hf_dir}: no model.safetensors or {SAFETENSORS_INDEX} (PyTorch .bin weights: {found}; "
                      "convert them to safetensors first)")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        path = hf_dir / fname
        if not path.is_file():
            raise HFError(f"{index}: lists {fname}, which does not exist")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise HFError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def load_hf_weights(model: Transformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy HF-named tensors into our model; missing, unexpected and misshapen tensors are errors that name them."""
    ours = model.state_dict()
    expected = {to_hf_name(n) for n in ours if not (n == "lm_head.weight" and model.cfg.tie_embeddings)}
    given = {n for n in tensors if not _IGNORED_HF.match(n)}
    if model.cfg.tie_embeddings and "lm_head.weight" in given:
        # Some tied checkpoints store the head anyway; harmless only if it is the embedding.
        if not torch.equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight", torch.empty(0))):
            raise HFError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                          "model.embed_tokens.weight")
        given.discard("lm_head.weight")
    differ = [f"{what} tensors: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
              for what, names in (("missing", sorted(expected - given)), ("unexpected", sorted(given - expected)))
              if names]
    if differ:
        raise HFError(f"{source}: the weights do not match the config: {'; '.join(differ)}")
    with torch.no_grad():
        for name, param in ours.items():
            hf_name = to_hf_name(name)
            if hf_name not in tensors:  # the tied head
                continue
            t = tensors[hf_name]
            if tuple(t.shape) != tuple(param.shape):
                raise HFError(f"{source}: tensor {hf_name} has shape {tuple(t.shape)}, the config implies "
                              f"{tuple(param.shape)}")
            param.copy_(t.to(param.dtype))


# ------------------------------------------------------------------------------------------- export / import


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise HFError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def export_hf(model: Transformer, cfg: Config, out_dir: str | os.PathLike, *, tokenizer=None,
              dtype: torch.dtype = torch.float32, bos_id: int | None = None, eos_id: int | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write a transformers-loadable directory (weights, config.json, generation_config.json, tokenizer files).

    bos/eos ids come from the tokenizer when one is given. Published like a prefix (megasynth.io.atomic_files):
    built beside `out_dir` and moved in with config.json last; existing EXPORT_FILES there are refused
    (FileExistsError) unless `overwrite`, which replaces them all (a stale shard or tokenizer file of an earlier
    export included) and leaves every other file alone.
    """
    out = Path(out_dir)
    _refuse_existing(out, EXPORT_FILES, overwrite)
    if tokenizer is not None:
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eod_id
    with atomic_files(out, EXPORT_FILES, commit="config.json", replace=overwrite) as tmp:
        write_safetensors(hf_state_dict(model, dtype), tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", hf_config(cfg.model, dtype=dtype, bos_id=bos_id, eos_id=eos_id))
        stop_ids = eos_id if tokenizer is None else generation_stop_ids(tokenizer)
        generation = {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": stop_ids}
        atomic_write_json(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            tokenizer.save(tmp)
            _clear_length_limits(tmp / HF_FILE)
    return out


def generation_stop_ids(tokenizer) -> int | list[int]:
    """generation_config.json's eos_token_id: EOD, and also the chat template's end of turn when the tokenizer
    keeps it as one token, so that an engine serving the export (vLLM, transformers) ends a chat turn where
    tools/generate.py --chat does (config.json keeps EOD alone, as Qwen's exports do)."""
    try:
        end_of_turn = load_chat_template(tokenizer).end_of_turn_id
    except ChatTemplateError:
        end_of_turn = None  # no chat tokens in this tokenizer: it writes plain text only
    if end_of_turn is None or end_of_turn == tokenizer.eod_id:
        return tokenizer.eod_id
    return [tokenizer.eod_id, end_of_turn]


def _refuse_existing(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """FileExistsError before any work when `out` holds files these functions own (atomic_files checks again)."""
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    existing = owned_names(names, os.listdir(out)) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out}: already exists ({', '.join(existing)}); pass overwrite / --overwrite to "
                              "replace it")


def _clear_length_limits(path: Path) -> None:
    """Drop truncation and padding saved in an exported tokenizer.json: we tokenize whole texts (see
    megasynth.tokenizer), and transformers or vLLM loading the export would otherwise cut and pad prompts."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("truncation") is None and data.get("padding") is None:
        return
    data["truncation"] = data["padding"] = None
    atomic_write_json(path, data)


def import_hf(hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Config]:
    """Our Transformer (eval mode, CPU, `dtype`) and Config from a Qwen3 or Llama Hugging Face directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    cfg = config_for_model(model_config_from_hf(_read_json(config_path), str(config_path)))
    tensors = read_safetensors(hf_dir)
    model = build_model(cfg.model, "cpu", seed=None)  # every weight is overwritten next
    load_hf_weights(model, tensors, str(hf_dir))
    return model.to(dtype).eval(), cfg


def import_hf_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                         dtype: torch.dtype = torch.float32, overwrite: bool = False) -> tuple[Path, str | None]:
    """import_hf + save_model_checkpoint into `out_dir`, with the tokenizer (if the HF directory has a usable
    one) in OUT_DIR/tokenizer. Returns (out_dir, a warning about the tokenizer or None). Published like a
    prefix (megasynth.io.atomic_files, meta.json last); existing IMPORT_FILES there are refused (FileExistsError)
    unless `overwrite`, which replaces them all and leaves every other file alone."""
    from megasynth.checkpoint import save_model_checkpoint  # noqa: PLC0415

    hf_dir, out = Path(hf_dir), Path(out_dir)
    _refuse_existing(out, IMPORT_FILES, overwrite)
    model, cfg = import_hf(hf_dir, dtype)
    tokenizer, warning = None, None
    if (hf_dir / HF_FILE).is_file() or (hf_dir / SP_FILE).is_file():
        try:
            tokenizer = load_tokenizer(hf_dir)
        except ValueError as e:
            warning = f"tokenizer not copied: {e}"
    else:
        warning = f"{hf_dir} holds no tokenizer.json or tokenizer.model: the checkpoint has no tokenizer/"
    meta = {"source": {"huggingface": str(hf_dir.resolve())},
            "tokenizer": tokenizer.identity() if tokenizer is not None else None}
    with atomic_files(out, IMPORT_FILES, commit="meta.json", replace=overwrite) as tmp:
        save_model_checkpoint(model, cfg, tmp, meta=meta)  # publishes its own temp directory as `tmp`
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
    return out, warning
