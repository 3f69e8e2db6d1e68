"""Config parsing: TOML, dotted overrides, errors that name the key, docstrings, saving."""

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from megasynth import config_parse

from megasynth.config import Config, ConfigError, DataSource, describe_config, load_config, save_config
from megasynth.config_parse import field_docs, parse_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_then_overrides(tmp_path):
    path = write(tmp_path, '[train]\nsteps = 7\n[optim]\nlr = 1e-3\n[[data.sources]]\npath = "a"\nweight = 0.25\n')
    cfg = load_config(path, ["--train.steps=9", "--optim.lr", "2", "--model.qk_norm=false", '--data.valid_paths=["x", "y"]'])
    assert cfg.train.steps == 9
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # an int where a float is expected is accepted
    assert cfg.model.qk_norm is False
    assert cfg.data.valid_paths == ["x", "y"]
    assert cfg.data.sources == [DataSource(path="a", weight=0.25)]
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size  # untouched keys keep defaults


def test_string_override_without_quotes():
    cfg = load_config(None, ["--train.run_dir=runs/x y", "--train.resume", "none"])
    assert cfg.train.run_dir == "runs/x y"
    assert cfg.train.resume == "none"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--train.stpes=5"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
        (["--trian.steps=5"], "unknown key 'trian'"),
        (["--train.steps=five"], "train.steps: expected an integer, got 'five'"),
        (["--train.steps=1.5"], "train.steps: expected an integer"),
        (["--model.qk_norm=yes"], "model.qk_norm: expected true or false"),
        (["--model.attention=flash"], "model.attention: expected one of 'sdpa', 'fused_qknorm_rope'"),
        (["--data.valid_paths=x"], "data.valid_paths: expected a list"),
        (["--train.steps"], "has no value"),
        (["steps=5"], "unexpected argument 'steps=5'"),
        (["--train=5"], "expected section.key"),
    ],
)
def test_override_errors_name_the_key(args, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert fragment in str(e.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    bad_key = write(tmp_path, "[model]\ndimm = 5\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key 'model\.dimm' \(did you mean 'model\.dim'\?\)"):
        load_config(bad_key)
    bad_type = write(tmp_path, '[model]\ndim = "big"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: model\.dim: expected an integer"):
        load_config(bad_type)
    bad_table = write(tmp_path, "[[data.sources]]\npath = 'a'\nwieght = 1\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.wieght"):
        load_config(bad_table)
    broken = write(tmp_path, "[model\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model.n_heads=6", "--model.n_kv_heads=4"], "model.n_kv_heads=4 must divide model.n_heads=6"),
        (["--model.attention=fused_qknorm_rope", "--model.qk_norm=false"], "needs model.qk_norm=true"),
        (["--data.seq_len=9000", "--model.max_seq_len=4096"], "data.seq_len=9000 exceeds model.max_seq_len=4096"),
        (["--data.data_path=a", '--data.sources=[{path="b", weight=1.0}]'], "not both"),
        (["--train.eval_batches=0"], "train.eval_batches must be >= 1"),
        (["--train.log_every=-1"], "must be >= 0"),
    ],
)
def test_cross_field_validation(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, args)


def test_renamed_attention_value_still_loads_with_one_warning(tmp_path, monkeypatch):
    # Run directories saved before the rename hold model.attention = "triton": they load (so the run resumes),
    # warn once per process, and the resolved config names the new value.
    monkeypatch.setattr(config_parse, "_WARNED", set())
    old = write(tmp_path, '[model]\nattention = "triton"\n')
    with pytest.warns(FutureWarning, match="model.attention='triton' is deprecated and read as 'fused_qknorm_rope'"):
        cfg = load_config(old)
    assert cfg.model.attention == "fused_qknorm_rope"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert load_config(None, ["--model.attention=triton"]).model.attention == "fused_qknorm_rope"
    save_config(cfg, tmp_path / "saved.toml")
    assert tomllib.loads((tmp_path / "saved.toml").read_text())["model"]["attention"] == "fused_qknorm_rope"


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    for f in dataclasses.fields(DataSource):
        assert field_docs(DataSource).get(f.name)
    text = describe_config()
    assert "--train.steps=1000  (int)" in text and "Optimizer steps to run." in text


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["--train.steps=3", '--data.sources=[{path="p", weight=2.0}]'])
    out = tmp_path / "run" / "config.toml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert not list(out.parent.glob(".*tmp*"))  # the temp file was renamed, not left behind
    with open(out, "rb") as f:
        assert tomllib.load(f)["train"]["steps"] == 3


def test_shipped_configs_load():
    for path in sorted((REPO / "examples" / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.model.qk_norm, path


def test_parse_overrides_values():
    assert parse_overrides(["--a.b=1", "--a.c=true", "--a.d=[1, 2]", "--a.e", "text"]) == {
        "a.b": 1,
        "a.c": True,
        "a.d": [1, 2],
        "a.e": "text",
    }


# Every numeric key with a value outside its range: (overrides, the one error line expected). These
# were once accepted (negative warmup or clipping) or crashed (model.n_heads=0: ZeroDivisionError while building
# the list of checks).
BAD_VALUES = [
    (["--model.vocab_size=0"], "model.vocab_size must be >= 1, got 0"),
    (["--model.dim=0"], "model.dim must be >= 1, got 0"),
    (["--model.n_layers=-1"], "model.n_layers must be >= 1, got -1"),
    (["--model.n_heads=0"], "model.n_heads must be >= 1, got 0"),
    (["--model.n_heads=0", "--model.dim=100"], "model.n_heads must be >= 1, got 0"),  # the first problem only
    (["--model.n_heads=-4"], "model.n_heads must be >= 1, got -4"),
    (["--model.n_kv_heads=-1"], "model.n_kv_heads must be >= 0, got -1"),
    (["--model.head_dim=-8"], "model.head_dim must be >= 0, got -8"),
    (["--model.head_dim=7"], "model.head_dim must be even (RoPE rotates pairs), got 7"),
    (["--model.dim=100", "--model.n_heads=4"], ("the head dimension model.dim / model.n_heads = 25 must be even "
                                               "(RoPE rotates pairs); change model.dim or model.n_heads, or set "
                                               "model.head_dim")),
    (["--model.dim=100", "--model.n_heads=3"], "model.dim=100 is not divisible by model.n_heads=3; set model.head_dim"),
    (["--model.ffn_dim=-1"], "model.ffn_dim must be >= 0, got -1"),
    (["--model.norm_eps=0"], "model.norm_eps must be a finite number > 0, got 0.0"),
    (["--model.rope_theta=-1"], "model.rope_theta must be a finite number > 0, got -1.0"),
    (["--model.max_seq_len=0"], "model.max_seq_len must be >= 1, got 0"),
    (["--model.init_std=inf"], "model.init_std must be a finite number > 0, got inf"),
    (["--data.seq_len=0"], "data.seq_len must be >= 1, got 0"),
    (['--data.sources=[{path="a", weight=-1.0}]'], "data.sources[0].weight must be a finite number >= 0, got -1.0"),
    (['--data.sources=[{path="a", weight=0.0}]'], "data.sources: at least one weight must be > 0"),
    (['--data.valid_paths=[""]'], "data.valid_paths[0] is empty"),
    (["--data.max_repetition=0"], "data.max_repetition must be > 0, got 0.0"),
    (["--data.max_repetition=nan"], "data.max_repetition must be > 0, got nan"),
    (["--data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
    (["--parallel.tp=0"], "parallel.tp must be >= 1, got 0"),
    (["--optim.lr=-0.001"], "optim.lr must be a finite number > 0, got -0.001"),
    (["--optim.lr=0"], "optim.lr must be a finite number > 0, got 0.0"),
    (["--optim.lr=nan"], "optim.lr must be a finite number > 0, got nan"),
    (["--optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be within [0.0, 1.0], got 1.5"),
    (["--optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0, got -1"),
    (["--optim.decay_fraction=-0.1"], "optim.decay_fraction must be within [0.0, 1.0], got -0.1"),
    (["--optim.weight_decay=-0.1"], "optim.weight_decay must be a finite number >= 0, got -0.1"),
    (["--optim.beta1=1.0"], "optim.beta1 must be within [0.0, 1.0), got 1.0"),
    (["--optim.beta2=-0.5"], "optim.beta2 must be within [0.0, 1.0), got -0.5"),
    (["--optim.eps=0"], "optim.eps must be a finite number > 0, got 0.0"),
    (["--optim.eps=-1e-8"], "optim.eps must be a finite number > 0, got -1e-08"),
    (["--optim.grad_clip=-1"], "optim.grad_clip must be a finite number >= 0 (0 disables clipping), got -1.0"),
    (["--optim.grad_clip=inf"], "optim.grad_clip must be a finite number >= 0 (0 disables clipping), got inf"),
    (["--train.steps=-1"], "train.steps must be >= 0, got -1"),
    (["--train.global_batch_size=0"], "train.global_batch_size must be >= 1, got 0"),
    (["--train.micro_batch_size=0"], "train.micro_batch_size must be >= 1, got 0"),
    (["--train.seed=-1"], "train.seed must be >= 0, got -1"),
    (['--train.run_dir=""'], "train.run_dir is empty"),
    (["--train.checkpoint_every=-1"], "train.checkpoint_every must be >= 0, got -1"),
    (["--train.keep_last=-1"], "train.keep_last must be >= 0, got -1"),
    (["--train.eval_every=-5"], "train.eval_every must be >= 0, got -5"),
    (["--train.eval_batches=0"], "train.eval_batches must be >= 1, got 0"),
    (["--train.log_every=-1"], "train.log_every must be >= 0, got -1"),
    (["--train.max_nonfinite_steps=0"], "train.max_nonfinite_steps must be >= 1, got 0"),
]


@pytest.mark.parametrize("args, line", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_each_bad_value_is_one_line_and_exit_2(args, line, capsys):
    from megasynth.train import main  # noqa: PLC0415

    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {line}\n" and captured.out == ""


def test_n_heads_zero_on_the_command_line_is_one_line_not_a_traceback():
    done = subprocess.run([sys.executable, "-m", "megasynth.train", "--model.n_heads=0"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "error: model.n_heads must be >= 1, got 0\n" and done.stdout == ""


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["--optim.warmup_steps=0", "--optim.grad_clip=0", "--optim.weight_decay=0",
                             "--optim.beta1=0", "--optim.min_lr_ratio=1", "--train.steps=0", "--model.n_kv_heads=0",
                             "--data.max_repetition=inf", "--train.seed=0", "--train.keep_last=0"])
    assert cfg.optim.grad_clip == 0.0 and cfg.data.max_repetition == float("inf")
