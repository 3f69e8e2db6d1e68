"""tools/preprocess_data.py as independent workers (issue 21): workers killed half-way through units and restarted,
a late fourth worker, publish refused until every unit is done; the published prefix is byte-identical to a
one-process run, and no unit was published twice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_tool
from workers import Zygote, chaos_workers, leftover_temps

from megasynth.tokenizer import train_bpe_tokenizer
from megasynth.work_units import published_counts

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "preprocess_data.py")
WORDS = ("Return a new list containing the items of the iterable in ascending order. The json module encodes "
         "and decodes JSON documents; a dictionary maps keys to values.").split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    for i in range(9):  # files of different sizes; one holds a bad line that --skip-bad-lines skips
        lines = [json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS):][: 1 + (i * j) % 17]) or "x"})
                 for j in range(20 + 7 * i)]
        if i == 4:
            lines.insert(3, '{"text": 5}')
        (root / "in").mkdir(exist_ok=True)
        (root / "in" / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    tok = train_bpe_tokenizer([" ".join(WORDS)] * 20, root / "tok", vocab_size=300)
    return root, tok.path


def _args(root: Path, tok: str, out: Path) -> list[str]:
    return [sys.executable, TOOL, "--input", str(root / "in"), "--tokenizer", tok, "--output-prefix", str(out),
            "--no-progress", "--skip-bad-lines", "--unit-bytes", "1500"]


def test_killed_and_late_workers_publish_the_bytes_of_one_process(inputs, tmp_path):
    root, tok = inputs
    ref = subprocess.run(_args(root, tok, tmp_path / "ref" / "data"), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out" / "data"
    work = Path(f"{out}.work")

    # The workers tokenize in their own process (--workers 0: no process pool started per unit, most of their
    # time), the reference in a pool of one: the same bytes either way. They are forked from a zygote.
    worker = [*_args(root, tok, out), "--workers", "0"]
    env = dict(os.environ)
    with Zygote(TOOL, env=env) as zygote:
        history = chaos_workers(lambda w: [*worker, "--worker", w], 9, seed=21, work_dir=work, env=env,
                                publish=lambda: zygote.run([*worker, "--publish"], env), start=zygote.start)
    num_units = json.loads((work / "manifest.json").read_text())["num_units"]
    assert num_units == 9 and len(set(history.killed_units)) >= 3
    for suffix in (".bin", ".idx", ".json"):
        assert Path(f"{out}{suffix}").read_bytes() == (tmp_path / "ref" / f"data{suffix}").read_bytes(), suffix
    assert published_counts(work / "events") == {k: 1 for k in range(num_units)}  # no unit made twice
    assert leftover_temps(work) == []
    assert sum(f"wrote {out}.bin" in o for o in history.outputs) == 1, history.outputs  # one publisher
    # A worker started after publishing has nothing to do; a publish says so too.
    again = subprocess.run([*_args(root, tok, out), "--worker", "1/3"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already published" in again.stdout, again.stdout + again.stderr


def test_other_settings_in_the_same_work_dir_are_refused_and_bad_flags_are_one_line(inputs, tmp_path, capsys):
    root, tok = inputs
    out = tmp_path / "data"
    main = load_tool("preprocess_data").main

    def run(*flags) -> tuple[int, str, str]:
        try:
            code = main([*_args(root, tok, out)[2:], *flags])
        except SystemExit as e:  # argparse's error()
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, stdout, _ = run("--worker", "0/2", "--no-publish", "--workers", "0")
    assert code == 0 and "made 9 of 9 units" in stdout  # a worker helps with the others' units too
    code, _, err = run("--worker", "1/2", "--unit-bytes", "3000")
    assert code == 2 and "other settings (unit_bytes: 1500 then, 3000 now)" in err, err
    for flags, message in ((["--worker", "3/3"], "0 <= I < N"), (["--worker", "x"], "expected I/N"),
                           (["--publish", "--no-publish"], "contradict"), (["--no-publish"], "needs --worker")):
        code, _, err = run(*flags)
        assert code == 2 and message in err and "Traceback" not in err, (flags, err)
