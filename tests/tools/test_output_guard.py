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


# -- result directories: refused unless --overwrite, published whole, other files kept ---------------------------------
def tiny_checkpoint(tmp: Path) -> tuple[Path, str]:
    """A weights-only checkpoint of helpers.tiny_config's model, and a prefix it can measure (vocab 64)."""
    from helpers import tiny_config  # noqa: PLC0415

    from megasynth.checkpoint import save_model_checkpoint  # noqa: PLC0415
    from megasynth.model import build_model  # noqa: PLC0415

    data = write_pattern_corpus(tmp / "data" / "valid", num_docs=8)
    cfg = tiny_config(tmp / "run", data)
    return save_model_checkpoint(build_model(cfg.model, "cpu", seed=0), cfg, tmp / "ckpt"), data


def write_metrics(run: Path, with_eval: bool) -> Path:
    run.mkdir(parents=True)
    lines = ['{"kind": "train", "step": 1, "loss": 3.0, "tokens": 128, "flops": 1e6}']
    if with_eval:
        lines.append('{"kind": "eval", "step": 1, "tokens": 128, "flops": 1e6, "name": "v", "loss": 2.5, "ppl": 12.2}')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def existing_results_cases(tmp: Path) -> dict[str, tuple[list, str]]:
    """Per tool: arguments writing into tmp/out, and one of its own files to plant there first. The refusal comes
    before any input is read, so the inputs need not exist."""
    out = tmp / "out"
    return {
        "eval": (["--checkpoint", tmp / "run", "--perplexity", tmp / "valid", "--out", out], "results.json"),
        "compare_runs": ([tmp / "run", "--out", out], "heldout_loss.png"),
        "plan_mixture": (["--compute-matched", "--config", tmp / "c.toml", "--tokens", "1M", "--real", "r=1K",
                          "--synthetic", "s=1K", "--oracle", "o=1M", "--out", out], "oracle.toml"),
        "export_hf": (["--checkpoint", tmp / "run", "--output", out], "model-00001-of-00002.safetensors"),
        "import_hf": (["--input", tmp / "hf", "--output", out], "tokenizer"),
    }


@pytest.mark.parametrize("tool", sorted(existing_results_cases(Path("/x"))))
def test_existing_results_are_refused_without_overwrite(tmp_path, capsys, tool):
    argv, own = existing_results_cases(tmp_path)[tool]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not the tool's\n")  # other files alone are no reason to refuse
    (out / own).mkdir() if own == "tokenizer" else (out / own).write_text("old\n")
    before = snapshot(tmp_path)
    line = refused(capsys, tool, argv)
    flag = "--output" if "--output" in argv else "--out"
    assert line.endswith(f"error: {flag} {out}: already exists ({own}); pass --overwrite to replace it"), line
    assert snapshot(tmp_path) == before


def test_compare_runs_overwrite_replaces_its_files_whole(tmp_path, capsys):
    tool = load_tool("compare_runs")
    out = tmp_path / "cmp"
    assert tool.main([str(write_metrics(tmp_path / "a", with_eval=True)), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "heldout_loss.png"]
    (out / "notes.txt").write_text("mine\n")
    b = write_metrics(tmp_path / "b", with_eval=False)
    before = snapshot(tmp_path)
    refused(capsys, "compare_runs", [b, "--out", out])
    assert snapshot(tmp_path) == before
    # A run without evaluations has no plot: the old one goes too, so the comparison never mixes two runs.
    assert tool.main([str(b), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "notes.txt"]
    assert "| b |" in (out / "comparison.md").read_text() and (out / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cmp"]  # no temp directory left
    capsys.readouterr()
    file = tmp_path / "file"
    file.write_text("not a directory\n")  # in the way, --overwrite or not
    line = refused(capsys, "compare_runs", [b, "--out", file])
    assert line.endswith(f"error: --out {file}: already exists (file); pass --overwrite to replace it")
    assert tool.main([str(b), "--out", str(file), "--overwrite"]) == 2
    assert capsys.readouterr().err == f"error: --out {file}: exists and is not a directory\n"
    assert (tmp_path / "file").read_text() == "not a directory\n"


def test_plan_mixture_overwrite_keeps_the_runs_beside_the_plan(tmp_path, capsys):
    tool = load_tool("plan_mixture")
    out = tmp_path / "plans"
    base = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.toml"
    argv = ["--compute-matched", "--config", str(base), "--real", "r=10K", "--synthetic", "s=1K", "--oracle", "o=1M",
            "--out", str(out)]
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")  # not the tool's: no reason to refuse
    assert tool.main([*argv, "--tokens", "100K"]) == 0
    first = (out / "oracle.toml").read_text()
    (out / "runs" / "baseline").mkdir(parents=True)  # the default runs root, OUT/runs: a training run's files
    (out / "runs" / "baseline" / "metrics.jsonl").write_text("{}\n")
    assert tool.main([*argv, "--tokens", "200K", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["baseline.toml", "notes.txt", "oracle.toml", "runs",
                                                     "synthetic.toml"]
    assert (out / "runs" / "baseline" / "metrics.jsonl").read_text() == "{}\n"
    assert (out / "oracle.toml").read_text() != first


def test_eval_overwrite_replaces_the_report_and_its_predictions(tmp_path, capsys):
    ckpt, valid = tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "old_task.jsonl").write_text("{}\n")  # an earlier report's predictions
    (out / "results.json").write_text("{}\n")
    (out / "notes.txt").write_text("mine\n")
    argv = ["--checkpoint", str(ckpt), "--perplexity", valid, "--perplexity-windows", "1", "--out", str(out)]
    before = snapshot(tmp_path)
    line = refused(capsys, "eval", argv)
    assert line.endswith("already exists (predictions, results.json); pass --overwrite to replace it")
    assert snapshot(tmp_path) == before
    assert load_tool("eval").main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "results.md"]  # predictions/ too
    assert list(json.loads((out / "results.json").read_text())["tasks"]) == ["valid"]


def test_export_and_import_hf_overwrite_replace_only_their_files(tmp_path, capsys):
    ckpt, _ = tiny_checkpoint(tmp_path)
    export, hf = load_tool("export_hf"), tmp_path / "hf"
    shard = ["--max-shard-gb", "0.00001"]  # 10.5 kB: the tiny model's weights in several shards
    assert export.main(["--checkpoint", str(ckpt), "--output", str(hf), "--no-tokenizer", *shard]) == 0
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) > 1
    (hf / "README.md").write_text("a model card\n")
    before = snapshot(tmp_path)
    line = refused(capsys, "export_hf", ["--checkpoint", ckpt, "--output", hf, "--no-tokenizer"])
    assert f"--output {hf}: already exists (config.json, generation_config.json, {shards[0]}" in line
    assert snapshot(tmp_path) == before
    # One file now: the stale shards and their index would otherwise sit beside model.safetensors.
    assert export.main(["--checkpoint", str(ckpt), "--output", str(hf), "--no-tokenizer", "--overwrite"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert (hf / "README.md").read_text() == "a model card\n"

    back = tmp_path / "back"
    import_hf = load_tool("import_hf")
    assert import_hf.main(["--input", str(hf), "--output", str(back)]) == 0
    assert "the checkpoint has no tokenizer/" in capsys.readouterr().err  # the export above had none
    (back / "tokenizer").mkdir()  # a tokenizer/ from an earlier import: the checkpoint's, so it is replaced
    (back / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    refused(capsys, "import_hf", ["--input", hf, "--output", back])
    assert snapshot(tmp_path) == before
    assert import_hf.main(["--input", str(hf), "--output", str(back), "--overwrite"]) == 0
    names = sorted(p.name for p in back.iterdir())
    assert "tokenizer" not in names and "notes.txt" in names and "meta.json" in names
    from megasynth.checkpoint import verify_checkpoint  # noqa: PLC0415

    verify_checkpoint(back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "ckpt", "data", "hf"]


# -- work directories and library entry points -------------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["entigraph", "rephrase", "synthesize"])
def test_a_work_dir_holding_an_input_is_refused(tmp_path, capsys, tool):
    corpus = write_pattern_corpus(tmp_path / "syn.work" / "real")
    if tool == "synthesize":
        argv, flag = ["--checkpoint", tmp_path / "run", "--corpus", corpus, "--num-docs", "1"], "--corpus"
    else:
        argv, flag = ["--input", corpus, "--tokenizer", tmp_path / "tok", *LLM], "--input"
    argv += ["--output-prefix", tmp_path / "syn"]
    work = tmp_path / "syn.work"
    before = snapshot(tmp_path)
    line = refused(capsys, tool, [*argv, "--work-dir", work])
    assert f"--work-dir {work}: the output is a directory that holds the input {flag} {corpus}.bin" in line
    line = refused(capsys, tool, [*argv, "--work-dir", f"{corpus}.idx"])
    assert f"--work-dir {corpus}.idx: the output would overwrite the input {flag} {corpus}.idx" in line
    if tool == "synthesize":  # the default work directory, OUT.work/, is an output too
        line = refused(capsys, tool, argv)
        assert f"--work-dir {work}: the output is a directory that holds the input --corpus" in line
    assert snapshot(tmp_path) == before


def test_library_entry_points_apply_the_same_rule(tmp_path):
    import re  # noqa: PLC0415

    from megasynth.data.merge import merge_datasets  # noqa: PLC0415
    from megasynth.data.readers import InputError  # noqa: PLC0415
    from megasynth.synth.entigraph import EntiGraphConfig, run_entigraph  # noqa: PLC0415
    from megasynth.synth.rephrase import RephraseConfig, run_rephrase  # noqa: PLC0415

    docs = tmp_path / "in" / "docs.jsonl"
    docs.parent.mkdir()
    docs.write_text('{"id": "1", "text": "a"}\n')
    corpus = write_pattern_corpus(tmp_path / "in" / "real")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    before = snapshot(tmp_path)
    for config, run in ((EntiGraphConfig, run_entigraph), (RephraseConfig, run_rephrase)):
        # A work directory that holds the input, named through a symlink: the real paths are compared.
        work = tmp_path / "link"
        with pytest.raises(InputError, match=re.escape(f"work_dir {work}: the output is a directory that holds the "
                                                       f"input input {docs}")):
            run(config(input=str(docs), work_dir=str(work), output_prefix=str(tmp_path / "syn"),
                       tokenizer=str(tmp_path / "tok")))
        with pytest.raises(InputError, match=re.escape(f"output_prefix {work / 'real'}: the output would overwrite "
                                                       f"the input input {corpus}.bin")):
            run(config(input=corpus, work_dir=str(tmp_path / "w"), output_prefix=str(work / "real"),
                       tokenizer=str(tmp_path / "tok")))
    # merge_datasets compared absolute paths: a symlinked spelling of the input passed; now it is refused.
    with pytest.raises(ValueError, match=re.escape(f"output_prefix {tmp_path / 'link' / 'real'}: the output would "
                                                   f"overwrite the input prefixes {corpus}.bin")):
        merge_datasets([corpus], tmp_path / "link" / "real", overwrite=True)
    assert snapshot(tmp_path) == before
