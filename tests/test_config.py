"""Config parsing: TOML, dotted overrides, errors that name the key, docstrings, saving."""

import dataclasses
import sys
from pathlib import Path

import pytest

from megasynth.config import (
    Config,
    ConfigError,
    DataSource,
    describe_config,
    field_docs,
    load_config,
    parse_overrides,
    save_config,
)

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
        (["--model.attention=flash"], "model.attention: expected one of 'sdpa', 'triton'"),
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
        (["--model.attention=triton", "--model.qk_norm=false"], "needs model.qk_norm=true"),
        (["--data.seq_len=9000", "--model.max_seq_len=4096"], "data.seq_len=9000 exceeds model.max_seq_len=4096"),
        (["--data.data_path=a", '--data.sources=[{path="b", weight=1.0}]'], "not both"),
        (["--train.eval_batches=0"], "train.eval_batches must be >= 1"),
        (["--train.log_every=-1"], "must be >= 0"),
    ],
)
def test_cross_field_validation(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, args)


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
