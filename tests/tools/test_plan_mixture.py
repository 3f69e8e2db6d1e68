"""megasynth/mixture.py and tools/plan_mixture.py: the repetition calculus, horizons, and compute-matched configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tool

from megasynth.config import load_config
from megasynth.data.indexed import IndexedDatasetWriter
from megasynth.mixture import (
    MixtureError,
    MixtureSource,
    generation_flops,
    parse_token_count,
    repetition_rows,
)
from megasynth.model import Transformer, flops_per_token

ROOT = Path(__file__).resolve().parents[2]
plan_mixture = load_tool("plan_mixture")
BASE = ROOT / "examples" / "configs" / "tiny.toml"


def run_main(capsys, *args):
    rc = plan_mixture.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_prefix(prefix, num_tokens, seed=0):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, num_tokens), size=9, replace=False))
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"vocab_size": 4096, "eod_id": 0}) as w:
        w.add_documents(np.split(rng.integers(1, 4096, size=num_tokens), cuts))
    return str(prefix)


# ----------------------------------------------------------------------------------------------- the calculus


def test_worked_example():
    # DESIGN.md §6 / the issue: over 10T tokens, 0.5T at a 20% share is read 4 times, 5T at 50% once.
    rows = repetition_rows([MixtureSource("real", 500 * 10**9, 0.2), MixtureSource("web", 5 * 10**12, 0.5),
                            MixtureSource("code", 3 * 10**12, 0.3)], 10 * 10**12)
    assert [r.epochs for r in rows] == pytest.approx([4.0, 1.0, 1.0], rel=1e-12)
    assert [r.horizon_tokens for r in rows] == pytest.approx([2e12, 5e12, 3e12], rel=1e-12)
    # Unnormalised weights are shares after normalisation.
    again = repetition_rows([MixtureSource("real", 500 * 10**9, 2), MixtureSource("web", 5 * 10**12, 8)], 10 * 10**12)
    assert [r.share for r in again] == pytest.approx([0.2, 0.8]) and again[0].epochs == pytest.approx(4.0)


def test_worked_example_through_the_tool(capsys):
    rc, out, _ = run_main(capsys, "--tokens", "10T", "--max-repetition", "3", "0.2", "real=0.5T", "0.5", "web=5T",
                          "0.3", "code=3T")
    assert rc == 0
    real = next(line for line in out.splitlines() if line.startswith("real"))
    web = next(line for line in out.splitlines() if line.startswith("web"))
    assert real.split()[1:5] == ["500.00B", "20.00%", "2.00T", "4.00"] and "WARNING: > 3 epochs" in real
    assert web.split()[1:5] == ["5.00T", "50.00%", "5.00T", "1.00"] and "WARNING" not in web


@pytest.mark.parametrize("text, value", [("0.5T", 5 * 10**11), ("10T", 10**13), ("250k", 250_000), ("3e9", 3 * 10**9),
                                         ("1_000", 1000), ("2.5B", 2_500_000_000), ("7M", 7_000_000), ("12", 12)])
def test_parse_token_count(text, value):
    assert parse_token_count(text) == value


@pytest.mark.parametrize("text", ["", "T", "1.5X", "-3B", "1e400", "ten"])
def test_parse_token_count_errors(text):
    with pytest.raises(MixtureError, match="token count"):
        parse_token_count(text)


def test_prefix_sources_read_their_unique_tokens(tmp_path, capsys):
    a, b = write_prefix(tmp_path / "a", 1000), write_prefix(tmp_path / "b", 250, seed=1)
    rc, out, _ = run_main(capsys, "--tokens", "5000", "0.5", a, "0.5", b)
    assert rc == 0
    row_b = next(line for line in out.splitlines() if line.startswith("b "))
    assert row_b.split()[1:5] == ["250", "50.00%", "2.50K", "10.00"]  # 5000 * 0.5 / 250


def test_flops_horizon_and_config_horizon(tmp_path, capsys):
    cfg = load_config(BASE)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    rc, out, _ = run_main(capsys, "--flops", f"{per_token * 2e9!r}", "--config", BASE, "x=1B")
    assert rc == 0 and "horizon of 2.00B training tokens" in out and "2.00" in out.splitlines()[-1]
    # --config alone: its own sources over steps x global batch x seq_len.
    prefix = write_prefix(tmp_path / "train", 4096)
    rc, out, _ = run_main(capsys, "--config", BASE, "--max-repetition", "100")
    assert rc == 2  # tiny.toml names no data
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(BASE.read_text().replace("[data]", f'[data]\ndata_path = "{prefix}"'))
    rc, out, _ = run_main(capsys, "--config", cfg_path)
    horizon = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    assert rc == 0 and f"{horizon / 4096:.2f}" in out and "WARNING: > 8 epochs" in out


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1T", "0.5", "nowhere", "0.5", "a=1T"], "source 'nowhere': no dataset prefix"),
    (["--tokens", "1Q", "a=1T"], "--tokens '1Q'"),
    (["--flops", "1e20", "a=1T"], "--flops needs --config"),
    (["a=1T"], "no horizon"),
    (["--tokens", "1T", "0.5", "a=1T", "0.5"], "weight without a prefix"),
    (["--tokens", "1T", "0.5", "a=1T", "0.5", "b=0"], "b: holds 0 tokens but has weight 0.5"),
    (["--tokens", "1T", "1", "a=0"], "a: holds 0 tokens"),
    (["--tokens", "1T", "--config", "/nonexistent.toml", "a=1T"], "/nonexistent.toml: config file not found"),
    (["--compute-matched", "--tokens", "1T", "--real", "r=1B"], "needs --config, --synthetic, --oracle, --out"),
    (["--tokens", "1T", "--real", "r=1B", "a=1T"], "--real is used with --compute-matched"),
])
def test_bad_input_exits_2_naming_it(capsys, args, message):
    rc, _, err = run_main(capsys, *args)
    assert rc == 2 and message in err, err


# ----------------------------------------------------------------------------------------------- compute matching


def test_compute_matched_configs(tmp_path, capsys):
    real = write_prefix(tmp_path / "real", 3000)
    oracle = write_prefix(tmp_path / "oracle", 90_000, seed=2)
    out = tmp_path / "plan"
    rc, stdout, err = run_main(capsys, "--compute-matched", "--config", BASE, "--tokens", "100000", "--real", real,
                               "--synthetic", "syn=20K", "--oracle", oracle, "--out", out, "--synthesis-flops", "1e12")
    assert rc == 0, err
    cfgs = {name: load_config(out / f"{name}.toml") for name in ("baseline", "synthetic", "oracle")}
    base = load_config(BASE)
    per_step = base.train.global_batch_size * base.data.seq_len
    steps = -(-100_000 // per_step)  # enough steps to cover the requested horizon
    budgets, flops = set(), set()
    for name, cfg in cfgs.items():
        assert cfg.model == base.model and cfg.optim == base.optim and cfg.data.seq_len == base.data.seq_len
        assert cfg.train.steps == steps and cfg.train.global_batch_size == base.train.global_batch_size
        assert cfg.train.run_dir == str(out / "runs" / name)
        budget = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
        budgets.add(budget)
        flops.add(flops_per_token(cfg.model, cfg.data.seq_len) * budget)
    assert len(budgets) == 1 and len(flops) == 1
    horizon = budgets.pop()
    assert [(s.path, s.weight) for s in cfgs["baseline"].data.sources] == [(real, 1.0)]
    assert [(s.path, s.weight) for s in cfgs["oracle"].data.sources] == [(oracle, 1.0)]
    (r, s) = cfgs["synthetic"].data.sources
    assert (r.path, s.path) == (real, "syn") and s.weight == pytest.approx(20_000 / horizon, rel=1e-12)
    assert r.weight + s.weight == pytest.approx(1.0, rel=1e-12)
    assert "placeholder" in (out / "synthetic.toml").read_text()
    summary = stdout.splitlines()[-3:]
    assert summary[1].startswith("synthetic") and summary[1].split()[-2:] == ["1e+12", f"{flops.pop() + 1e12:.3g}"]
    assert summary[0].split()[-2] == "0"
    # Re-running needs --overwrite, which replaces the plan in place (no temp files left behind).
    again = ["--compute-matched", "--config", BASE, "--tokens", "100000", "--real", real, "--synthetic", "syn=20K",
             "--oracle", oracle, "--out", out]
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, *again)
    assert exc.value.code == 2 and "already exists (baseline.toml, oracle.toml, synthetic.toml)" in \
        capsys.readouterr().err
    assert run_main(capsys, *again, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["baseline.toml", "oracle.toml", "synthetic.toml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle.bin", "oracle.idx", "oracle.json", "plan",
                                                          "real.bin", "real.idx", "real.json"]


def test_synthetic_weight_is_capped_at_one(tmp_path, capsys):
    rc, _, err = run_main(capsys, "--compute-matched", "--config", BASE, "--tokens", "1000", "--real", "r=100",
                          "--synthetic", "s=1M", "--oracle", "o=10K", "--out", tmp_path)
    assert rc == 0, err
    (only,) = load_config(tmp_path / "synthetic.toml").data.sources
    assert (only.path, only.weight) == ("s", 1.0)


def test_synthesizer_flops_are_two_x_matmul_params_x_tokens(tmp_path, capsys):
    cfg = load_config(BASE)
    # Independent count: every nn.Linear weight of the model (projections and the head, tied or not).
    with torch.device("meta"):
        model = Transformer(cfg.model)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert generation_flops(cfg.model, 1000) == pytest.approx(2 * matmul_params * 1000, rel=1e-12)
    rc, stdout, err = run_main(capsys, "--compute-matched", "--config", BASE, "--tokens", "1M", "--real", "r=10K",
                               "--synthetic", "s=100K", "--oracle", "o=2M", "--out", tmp_path,
                               "--synthesizer-config", BASE, "--synthetic-tokens", "300K")
    assert rc == 0, err
    synthetic_line = next(line for line in stdout.splitlines() if line.startswith("synthetic "))
    assert synthetic_line.split()[-2] == f"{2 * matmul_params * 300_000:.3g}"

