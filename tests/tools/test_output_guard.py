"""Issue 19: no tool in tools/ destroys an input. Each reproduced case (an output that is, holds or sits inside an
input; results replaced unasked; a NaN float flag) exits 2 with one stderr line and leaves every file as it was;
then a walk over every tools/*.py checks that each float flag uses megasynth.cli's validators and that each tool
with an output flag refuses an output equal to one of its inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TOOLS, load_tool, write_pattern_corpus

from megasynth.cli import ToolParser, is_float_type

OUTPUT_FLAGS = {"--output", "--output-prefix", "--out"}
LLM = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def refused(capsys, tool: str, argv: list) -> str:
    """Run tools/TOOL.py's main in-process; assert exit code 2 and exactly one stderr line; return that line."""
    with pytest.raises(SystemExit) as exc:
        load_tool(tool).main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


def test_import_quality_out_holding_the_input_is_refused(tmp_path, capsys):
    (tmp_path / "q").mkdir()
    src = tmp_path / "q" / "QuALITY.v1.0.1.train"
    src.write_text('{"article_id": "1"}\n')
    (tmp_path / "q" / "notes.txt").write_text("a sibling\n")
    before = snapshot(tmp_path)
    line = refused(capsys, "import_quality", ["--input", src, "--out", tmp_path / "q", "--overwrite"])
    assert line.endswith(f"error: --out {tmp_path / 'q'}: the output is a directory that holds the input --input {src}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("tool", ["entigraph", "rephrase"])
def test_llm_pipelines_refuse_the_input_prefix_as_output(tmp_path, capsys, tool):
    corpus = write_pattern_corpus(tmp_path / "data" / "real")
    before = snapshot(tmp_path)
    line = refused(capsys, tool, ["--input", corpus, "--output-prefix", corpus, "--overwrite", "--work-dir",
                                  tmp_path / "work", "--tokenizer", tmp_path / "tok", *LLM])
    assert f"--output-prefix {corpus}: the output would overwrite the input --input {corpus}.bin" in line
    assert snapshot(tmp_path) == before  # not even the work directory was created


def test_build_pairs_refuses_the_embeddings_as_output(tmp_path, capsys):
    emb = tmp_path / "emb"
    np.save(f"{emb}.npy", np.eye(4, dtype=np.float16))
    (tmp_path / "emb.json").write_text(json.dumps({"input": {"type": "jsonl", "path": "docs.jsonl"}}))
    before = snapshot(tmp_path)
    line = refused(capsys, "build_pairs", ["--embeddings", emb, "--output", emb, "--overwrite"])
    assert f"--output {emb}: the output would overwrite the input --embeddings {emb}.json" in line
    # The corpus EMB.json names (the default --corpus) is an input too.
    corpus = write_pattern_corpus(tmp_path / "real")
    (tmp_path / "emb.json").write_text(json.dumps({"input": {"type": "prefix", "prefix": corpus}}))
    before = snapshot(tmp_path)
    line = refused(capsys, "build_pairs", ["--embeddings", emb, "--output", corpus, "--overwrite"])
    assert f"the output would overwrite the input --corpus {corpus}" in line
    assert snapshot(tmp_path) == before


def test_synth_quality_keeps_existing_results_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}\n')
    before = snapshot(tmp_path)
    line = refused(capsys, "synth_quality", ["--synthetic", tmp_path / "syn", "--corpus", tmp_path / "real",
                                             "--out", out])
    assert line.endswith(f"error: --out {out}: already exists (results.json); pass --overwrite to replace it")
    line = refused(capsys, "synth_quality", ["--synthetic", out / "syn", "--corpus", tmp_path / "real", "--out", out,
                                             "--overwrite"])
    assert "holds the input --synthetic" in line
    assert snapshot(tmp_path) == before


def test_import_quality_overwrite_replaces_only_its_own_files(tmp_path):
    src = tmp_path / "quality.jsonl"
    options = [{"text": t} for t in ("a", "b", "c", "d")]
    rec = {"article_id": "1", "set_unique_id": "1_S", "title": "T", "article": "Some text.", "writer_id": "w",
           "questions": [{"question": "Q?", "question_unique_id": "1_S_1", "options": [o["text"] for o in options],
                          "gold_label": 1, "difficult": 0}]}
    src.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "quality_heldout.jsonl").write_text("stale, from an earlier run with a split\n")
    tool = load_tool("import_quality")
    with pytest.raises(SystemExit):  # quality_heldout.jsonl is one of its files: refused without --overwrite
        tool.main(["--input", str(src), "--out", str(out)])
    assert tool.main(["--input", str(src), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["documents.jsonl", "import.json", "notes.txt", "quality.jsonl"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "quality.jsonl"]  # no temp directory left


def test_synthesize_temperature_nan_is_refused(tmp_path, capsys):
    corpus = write_pattern_corpus(tmp_path / "real")
    before = snapshot(tmp_path)
    line = refused(capsys, "synthesize", ["--checkpoint", tmp_path / "run", "--corpus", corpus, "--output-prefix",
                                          tmp_path / "syn", "--num-docs", "4", "--temperature", "nan"])
    assert line.endswith("error: argument --temperature: expected a number >= 0, got 'nan'")
    assert snapshot(tmp_path) == before


# -- every tool -------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    pass


def parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The tool's parser: build_parser() where it has one, else the parser its main() builds (caught when it parses)."""
    tool = load_tool(name)
    if hasattr(tool, "build_parser"):
        return tool.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured) as caught:
        tool.main([])
    monkeypatch.undo()
    return caught.value.args[0]


ALL_TOOLS = sorted(p.stem for p in TOOLS.glob("*.py"))


def test_every_float_flag_uses_the_shared_validator(monkeypatch, capsys):
    checked = 0
    for name in ALL_TOOLS:
        parser = parser_of(name, monkeypatch)
        assert isinstance(parser, ToolParser), f"tools/{name}.py: build its parser with megasynth.cli.ToolParser"
        for action in parser._actions:
            if not action.option_strings or action.type is None:
                continue
            try:
                parsed = action.type("0.5")
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                continue
            if not isinstance(parsed, float):
                continue
            flag = action.option_strings[-1]
            assert is_float_type(action.type), f"tools/{name}.py {flag}: use a megasynth.cli float type, not float"
            for bad in ("nan", "inf"):
                with pytest.raises(SystemExit) as exc:
                    parser.parse_args([flag, bad])
                err = capsys.readouterr().err
                assert exc.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: expected" in err, err
            checked += 1
    assert checked >= 30  # the walk found the flags (build_pairs, synthesize, the LLM flags, ...)


def output_equals_input(tmp: Path) -> dict[str, list]:
    """Per tool, arguments whose output is (or holds) one of its inputs; nothing needs to exist, since the check
    runs before anything is read."""
    p, d, run = tmp / "data" / "x", tmp / "dir", tmp / "run"
    return {
        "build_pairs": ["--embeddings", p, "--output", p],
        "compare_runs": [run, "--out", run],
        "embed_corpus": ["--input", p, "--output", p],
        "entigraph": ["--input", p, "--work-dir", tmp / "w", "--output-prefix", p, "--tokenizer", tmp / "t", *LLM],
        "eval": ["--checkpoint", run, "--tasks", d / "task.jsonl", "--out", d],
        "export_hf": ["--checkpoint", run, "--output", run],
        "generate": ["--checkpoint", run, "--prompts-file", d / "p.jsonl", "--output", d / "p.jsonl"],
        "import_hf": ["--input", d, "--output", d],
        "import_quality": ["--input", d / "q.jsonl", "--out", d],
        "make_pair_dataset": ["--pairs", tmp / "pairs.parquet", "--corpus", p, "--output-prefix", p],
        "merge_datasets": ["--inputs", p, "--output", p],
        "plan_mixture": ["--config", d / "c.toml", "--out", d],
        "preprocess_data": ["--input", tmp / "in.json", "--tokenizer", tmp / "t", "--output-prefix", tmp / "in"],
        "preprocess_sft": ["--input", tmp / "in.json", "--tokenizer", tmp / "t", "--output-prefix", tmp / "in"],
        "rephrase": ["--input", p, "--work-dir", tmp / "w", "--output-prefix", p, "--tokenizer", tmp / "t", *LLM],
        "synth_quality": ["--synthetic", d / "s", "--corpus", p, "--out", d],
        "synthesize": ["--checkpoint", run, "--corpus", p, "--output-prefix", p, "--num-docs", "1"],
        "train_tokenizer": ["--input", d / "a.jsonl", "--output", d, "--type", "bpe", "--vocab-size", "64"],
    }


def test_every_tool_with_an_output_refuses_an_input_as_output(tmp_path, monkeypatch, capsys):
    cases = output_equals_input(tmp_path)
    writers = [name for name in ALL_TOOLS
               if any(set(a.option_strings) & OUTPUT_FLAGS for a in parser_of(name, monkeypatch)._actions)]
    assert sorted(cases) == writers, "a tool with an output flag needs a case here (and megasynth.cli.check_outputs)"
    for name, argv in cases.items():
        line = refused(capsys, name, argv)
        assert "the output would overwrite the input" in line or "the output is a directory that holds" in line, \
            f"tools/{name}.py: {line}"
    assert snapshot(tmp_path) == {}  # nothing was created on the way
