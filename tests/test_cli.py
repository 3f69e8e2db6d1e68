"""megasynth/cli.py: the overlap rule every writing tool applies, the float validators, the one-line parser."""

from __future__ import annotations

import argparse
import os

import pytest

from megasynth.cli import (
    ToolParser,
    directory,
    file,
    finite_float,
    float_range,
    is_float_type,
    nonnegative_float,
    output_refusal,
    overlap_refusal,
    positive_float,
    prefix,
    run_dir,
    unit_float,
)


def test_same_file_by_any_route_is_refused(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(src)
    (tmp_path / "sub").mkdir()
    assert overlap_refusal({"--output": file(src)}, {"--input": str(src)}) == (
        f"--output {src}: the output would overwrite the input --input {src}")
    assert "would overwrite" in overlap_refusal({"--output": file(tmp_path / "link.jsonl")}, {"--input": str(src)})
    assert "would overwrite" in overlap_refusal({"--output": file(tmp_path / "sub" / ".." / "docs.jsonl")},
                                                {"--input": str(src)})
    assert overlap_refusal({"--output": file(tmp_path / "other.jsonl")}, {"--input": str(src)}) is None


def test_a_prefix_is_all_of_its_files(tmp_path):
    p = str(tmp_path / "data" / "x")
    for out, inp in [(prefix(p), prefix(p)), (prefix(p), p + ".bin"), (file(p + ".idx"), prefix(p)),
                     (prefix(p), p + ".provenance.parquet"), (prefix(p), p + ".json"),   # EMB.json vs PAIRS.json
                     (prefix(tmp_path / "in"), str(tmp_path / "in.json"))]:
        assert "would overwrite the input" in overlap_refusal({"--output-prefix": out}, {"--input": inp})
    # An output prefix is the files its tool writes: a pair table beside the pair prefix made from it is fine.
    pairs = tmp_path / "pairs"
    for table in (file(f"{pairs}.parquet"), f"{pairs}.parquet"):
        assert overlap_refusal({"--output-prefix": prefix(pairs)}, {"--pairs": table}) is None
    assert "would overwrite the input --embeddings" in overlap_refusal(
        {"--output": prefix(pairs, (".parquet", ".json", ".png"))}, {"--embeddings": prefix(pairs)})
    # Beside an input prefix, in the same directory, is where outputs normally go.
    assert overlap_refusal({"--output-prefix": prefix(p + "-synth")}, {"--input": prefix(p)}) is None
    assert overlap_refusal({"--output-prefix": prefix(p + "x")}, {"--input": p}) is None


def test_directories_holding_or_inside_an_input(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("{}\n")
    held = overlap_refusal({"--out": directory(tmp_path)}, {"--input": str(tmp_path / "corpus" / "a.jsonl")})
    assert held == (f"--out {tmp_path}: the output is a directory that holds the input --input "
                    f"{tmp_path / 'corpus' / 'a.jsonl'}")
    assert "holds the input" in overlap_refusal({"--out": directory(tmp_path)}, {"--corpus": prefix(tmp_path / "c")})
    inside = overlap_refusal({"--output-prefix": prefix(tmp_path / "corpus" / "tok")},
                             {"--input": str(tmp_path / "corpus")})
    assert "would be written inside the input --input" in inside
    assert overlap_refusal({"--out": directory(tmp_path / "q")}, {"--input": str(tmp_path / "corpus")}) is None


def test_a_run_directory_guards_its_checkpoints_not_its_neighbours(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert overlap_refusal({"--out": directory(run / "eval")}, {"--checkpoint": run_dir(run)}) is None
    assert "inside the input" in overlap_refusal({"--output": directory(run / "checkpoints" / "x")},
                                                 {"--checkpoint": run_dir(run)})
    assert "would overwrite" in overlap_refusal({"--output": directory(run)}, {"--checkpoint": run_dir(run)})
    step = run / "checkpoints" / "step_00000010"  # a step directory is an input as a whole
    (step / "meta.json").write_text("{}\n")
    assert "inside the input" in overlap_refusal({"--out": directory(step / "hf")}, {"--checkpoint": run_dir(step)})


def test_globs_lists_and_unset_flags(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("{}\n")
    glob = str(tmp_path / "*.jsonl")
    assert f"--input {tmp_path / 'b.jsonl'}" in overlap_refusal({"--output": file(tmp_path / "b.jsonl")},
                                                                 {"--input": [glob]})
    assert overlap_refusal({"--output": file(tmp_path / "c.txt")}, {"--input": [glob], "--tokenizer": None,
                                                                     "--model": ""}) is None


def test_existing_outputs_need_overwrite(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    spec = directory(out, ("results.json", "results.md"))
    assert output_refusal({"--out": spec}, {}, overwrite=False) is None  # a foreign file is not an output
    (out / "results.md").write_text("old\n")
    assert output_refusal({"--out": spec}, {}, overwrite=False) == (
        f"--out {out}: already exists (results.md); pass --overwrite to replace it")
    assert output_refusal({"--out": spec}, {}, overwrite=True) is None
    assert output_refusal({"--out": spec}, {}, overwrite=None) is None  # the tool checks existence itself
    assert "overwrite the input" in output_refusal({"--out": file(out / "notes.txt")},
                                                   {"--in": str(out / "notes.txt")}, overwrite=True)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "abc", ""])
def test_float_types_refuse_non_finite(text):
    for kind in (finite_float, positive_float, nonnegative_float, unit_float, float_range(-1, 1)):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a"):
            kind(text)


def test_float_type_ranges():
    assert finite_float("-3.5") == -3.5 and nonnegative_float("0") == 0.0 and unit_float("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number > 0, got '0'"):
        positive_float("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a number in \[0, 1\], got '1.5'"):
        unit_float("1.5")
    half_open = float_range(0, 1, low_open=True)
    assert half_open("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\]"):
        half_open("0")
    assert all(is_float_type(t) for t in (finite_float, positive_float, half_open)) and not is_float_type(float)


def test_tool_parser_errors_are_one_line(capsys):
    parser = ToolParser(prog="tool.py")
    parser.add_argument("--temperature", type=nonnegative_float)
    parser.add_argument("--out", required=True)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--out", "x", "--temperature", "nan"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("tool.py: error: argument --temperature: expected a number >= 0, "
                                       "got 'nan'\n")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert capsys.readouterr().err.count("\n") == 1


def test_paths_are_compared_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("a")
    assert "would overwrite" in overlap_refusal({"--output-prefix": prefix("a/../x")},
                                                {"--input": prefix(tmp_path / "x")})
