"""tools/compare_runs.py on metrics files written by real training runs (megasynth.train), and on bad files."""

import json
from pathlib import Path

import matplotlib.image
import pytest
from helpers import load_tool, tiny_config, write_pattern_corpus

from megasynth.config import save_config
from megasynth.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
compare_runs = load_tool("compare_runs")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short CPU runs with two held-out sets: one on a single source, one on a two-source blend."""
    root = tmp_path_factory.mktemp("runs")
    a = write_pattern_corpus(root / "data" / "a", seed=0)
    b = write_pattern_corpus(root / "data" / "b", seed=1, num_docs=12)
    valid = [write_pattern_corpus(root / "data" / name, seed=s, num_docs=8) for name, s in (("va", 0), ("vb", 1))]
    runs = []
    for name, data_path in (("single", a), ("blend", f"0.7 {a} 0.3 {b}")):
        cfg = tiny_config(root / name, a, **{"train.steps": 4, "train.eval_every": 2, "train.eval_batches": 1})
        cfg.data.data_path = data_path
        cfg.data.valid_paths = valid
        save_config(cfg, root / f"{name}.toml")
        # The entry point of `python -m megasynth.train`, called in-process: a subprocess would add seconds of
        # imports per run to the suite.
        assert train_main(["--config", str(root / f"{name}.toml")]) == 0
        runs.append(root / name)
    return runs


def records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_table_and_plot_from_real_runs(two_runs, tmp_path, capsys):
    single, blended = two_runs
    out = tmp_path / "cmp"
    rc = compare_runs.main([str(single), str(blended / "metrics.jsonl"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    table = (out / "comparison.md").read_text().splitlines()
    header = table[2]
    assert header == "| run | steps | tokens | FLOPs | va loss | va ppl | vb loss | vb ppl |"
    for run_dir, line in zip(two_runs, table[4:6]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        last_train = records(run_dir, "train")[-1]
        final = {r["name"]: r for r in records(run_dir, "eval") if r["step"] == 4}
        assert cells[0] == run_dir.name and cells[1] == "4"
        assert cells[2] == f"{last_train['tokens']:,}" and cells[3] == f"{last_train['flops']:.4g}"
        assert cells[4:] == [f"{final['va']['loss']:.4f}", f"{final['va']['ppl']:.2f}",
                             f"{final['vb']['loss']:.4f}", f"{final['vb']['ppl']:.2f}"]
    # Both runs train on the same number of tokens (same steps, batch, seq_len): the blend changes only the data.
    assert table[4].split("|")[3] == table[5].split("|")[3]

    image = matplotlib.image.imread(out / "heldout_loss.png")
    assert image.ndim == 3 and image.shape[1] > 1.5 * image.shape[0]  # two panels side by side
    plotted = compare_runs.plot_heldout(compare_runs.load_runs([str(p) for p in two_runs]), tmp_path / "p.png")
    assert sorted(plotted) == ["va", "vb"]
    for run_dir in two_runs:
        evals = [r for r in records(run_dir, "eval") if r["name"] == "vb"]
        assert plotted["vb"][run_dir.name] == ([r["tokens"] for r in evals], [r["loss"] for r in evals])


def test_labels_name_the_runs_in_the_table_and_the_legend(two_runs, tmp_path, capsys):
    labels = ["real only", "SBP (real + synthetic)"]
    out = tmp_path / "cmp"
    argv = [str(p) for p in two_runs] + ["--out", str(out)]
    assert compare_runs.main(argv + [arg for label in labels for arg in ("--label", label)]) == 0
    rows = (out / "comparison.md").read_text().splitlines()[4:6]
    assert [r.strip("|").split("|")[0].strip() for r in rows] == labels
    plotted = compare_runs.plot_heldout(compare_runs.load_runs([str(p) for p in two_runs], labels), tmp_path / "p.png")
    assert sorted(plotted["va"]) == sorted(labels)
    capsys.readouterr()
    assert compare_runs.main(argv + ["--label", "one"]) == 2
    assert "--label: 1 given for 2 runs" in capsys.readouterr().err


def write_metrics(path, lines, trailing_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    return path


TRAIN = '{"kind": "train", "step": 1, "loss": 3.0, "tokens": 128, "flops": 1e6}'
EVAL = '{"kind": "eval", "step": 1, "tokens": 128, "flops": 1e6, "name": "v", "loss": 2.5, "ppl": 12.18}'


@pytest.mark.parametrize("lines, message", [
    ([TRAIN, "{not json"], ":2: not valid JSON"),
    ([TRAIN, "[1, 2]", TRAIN], ":2: expected a JSON object"),
    (['{"step": 3}'], ':1: record has no "kind"'),
    (['{"kind": "eval", "step": 1, "tokens": 5, "flops": 1.0, "name": "v", "ppl": 3.0}'],
     ":1: eval record lacks 'loss'"),
    ([TRAIN, TRAIN.replace('"tokens": 128', '"tokens": "many"')], ':2: field "tokens" must be an integer'),
    ([EVAL.replace('"name": "v"', '"name": ""')], ':1: field "name" must be a non-empty string'),
    ([], "no train or eval records"),
])
def test_bad_metrics_name_file_and_line(tmp_path, capsys, lines, message):
    path = write_metrics(tmp_path / "r" / "metrics.jsonl", lines)
    assert compare_runs.main([str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{path}" in err and message in err, err


def test_missing_run_and_torn_last_line(tmp_path, capsys):
    assert compare_runs.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: no such file" in capsys.readouterr().err
    # A writer killed mid-line leaves a last line without newline: skipped with a warning, the rest is used.
    write_metrics(tmp_path / "r" / "metrics.jsonl", [TRAIN, EVAL, '{"kind": "tra'], trailing_newline=False)
    assert compare_runs.main([str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert ":3: skipping a torn last line" in captured.err
    assert "| r | 1 | 128 | 1e+06 | 2.5000 | 12.18 |" in captured.out


def test_non_finite_losses_and_runs_without_evals(tmp_path, capsys):
    write_metrics(tmp_path / "a" / "metrics.jsonl", [TRAIN, EVAL.replace('"loss": 2.5', '"loss": "nan"')])
    write_metrics(tmp_path / "b" / "metrics.jsonl", [TRAIN])
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| a | 1 | 128 | 1e+06 | nan | 12.18 |" in out and "| b | 1 | 128 | 1e+06 | — | — |" in out
    assert (tmp_path / "o" / "heldout_loss.png").is_file()
