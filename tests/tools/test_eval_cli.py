"""tools/eval.py end to end on the example task files and a perplexity prefix; 2 CPU ranks give the same
results as one process; malformed inputs exit 2 naming FILE:LINE before the model loads."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from dist import run_on_ranks
from helpers import load_tool

from megasynth.checkpoint import save_model_checkpoint
from megasynth.config import ModelConfig
from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.eval.harness import EvalSettings, run_perplexity
from megasynth.eval.loglik import score_continuations
from megasynth.hf import config_for_model
from megasynth.model import build_model
from megasynth.tokenizer import load_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TASKS = [ROOT / "examples" / "eval" / f for f in ("capitals.jsonl", "arithmetic_qa.jsonl", "quality_closed_book.jsonl")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint step directory with its tokenizer inside (as import_hf writes it) and a held-out prefix."""
    root = tmp_path_factory.mktemp("evalrun")
    texts = [p.read_text() for p in TASKS]
    tok = train_bpe_tokenizer(texts * 5, root / "tok", vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=512, rope_theta=10000.0)
    model = build_model(cfg, "cpu", seed=2)
    ckpt = root / "ckpt"
    save_model_checkpoint(model, config_for_model(cfg), ckpt)
    tok.save(ckpt / "tokenizer")
    meta = {"vocab_size": tok.vocab_size, "eod_id": tok.eod_id}
    with IndexedDatasetWriter(root / "valid", np.uint16, metadata=meta) as w:
        for line in TASKS[0].read_text().splitlines():
            w.add_document(np.asarray(tok.encode(line, append_eod=True)))
    return ckpt, root / "valid", model.eval()


def common_args(ckpt, valid):
    return ["--checkpoint", str(ckpt), "--tasks", *map(str, TASKS), "--perplexity", str(valid), "--seq-len", "64",
            "--num-fewshot", "2", "--max-new-tokens", "4", "--batch-size", "5"]


def eval_main(argv: list[str]) -> int:  # module-level: the ranks import it by name
    return load_tool("eval").main(argv)


def test_single_process_report_and_two_ranks_agree(setup, tmp_path):
    ckpt, valid, model = setup
    one, two = tmp_path / "one", tmp_path / "two"
    assert load_tool("eval").main([*common_args(ckpt, valid), "--out", str(one)]) == 0
    results = json.loads((one / "results.json").read_text())
    tasks = results["tasks"]
    assert list(tasks) == ["capitals", "arithmetic_qa", "quality_closed_book", "valid"]
    assert (tasks["capitals"]["n"], tasks["arithmetic_qa"]["n"], tasks["quality_closed_book"]["n"]) == (6, 5, 5)
    assert set(tasks["capitals"]["metrics"]) == {"acc", "acc_norm"}
    assert set(tasks["arithmetic_qa"]["metrics"]) == {"exact_match", "f1"}
    assert tasks["quality_closed_book"]["config"]["answer_format"] == "text"
    for name in ("capitals", "arithmetic_qa", "quality_closed_book"):
        records = [json.loads(l) for l in (one / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        metric = next(iter(tasks[name]["metrics"]))
        # The reported metric is the plain mean of the per-example values it was reduced from.
        assert tasks[name]["metrics"][metric] == pytest.approx(sum(r[metric] for r in records) / len(records))
    # Perplexity through the CLI equals the library call (whole prefix, 64-token windows).
    ppl = run_perplexity(model, str(valid), EvalSettings(), seq_len=64)
    assert tasks["valid"]["metrics"]["loss"] == pytest.approx(ppl["metrics"]["loss"], rel=1e-6)
    assert tasks["valid"]["n"] == IndexedDataset(valid).num_tokens - 1
    table = (one / "results.md").read_text()
    assert "| capitals | multiple_choice | 6 |" in table and "| valid | perplexity |" in table

    # Two processes with torchrun's variables (tests/dist.py); the tool makes the process group itself, as
    # under `torchrun --nproc_per_node=2 tools/eval.py ...` (the launcher itself would add seconds of start-up
    # per process and test nothing of the tool's).
    assert run_on_ranks(eval_main, 2, [*common_args(ckpt, valid), "--out", str(two)], init_group=False,
                        timeout=300) == [0, 0]
    distributed = json.loads((two / "results.json").read_text())
    for name, res in tasks.items():
        other = distributed["tasks"][name]
        assert other["n"] == res["n"]
        if res["type"] == "perplexity":
            # Same token sums, but each rank runs other batch shapes with one thread: fp32 logits move by ~1e-7
            # relative (measured 3e-8 on the loss).
            assert other["metrics"]["loss"] == pytest.approx(res["metrics"]["loss"], rel=1e-6)
        else:
            assert other["metrics"] == res["metrics"], name  # sums of 0/1 (or F1) values and counts: exact
    for name in ("capitals", "arithmetic_qa", "quality_closed_book"):
        mine = (one / "predictions" / f"{name}.jsonl").read_text().splitlines()
        theirs = (two / "predictions" / f"{name}.jsonl").read_text().splitlines()
        for a, b in zip(map(json.loads, mine), map(json.loads, theirs), strict=True):
            if "logliks" in a:  # fp32 in other batch shapes, as above
                assert b.pop("logliks") == pytest.approx(a.pop("logliks"), abs=1e-4)
            assert a == b


def test_bad_inputs_exit_2_before_loading(setup, tmp_path, capsys):
    ckpt, valid, _ = setup
    tool = load_tool("eval")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "generative", "prompt": "p", "answers": ["a"]}\n{"type": "generative", "prompt": "p"}\n')
    # A checkpoint path that does not exist: the task file error must come first.
    assert tool.main(["--checkpoint", str(tmp_path / "none"), "--tasks", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f'{bad}:2: field "answers"' in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(ckpt), "--tasks", str(TASKS[0]), "--num-fewshot", "4",
                      "--out", str(tmp_path / "o")]) == 2
    assert "--num-fewshot 4 needs that many" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(ckpt), "--perplexity", str(tmp_path / "nope"),
                      "--out", str(tmp_path / "o")]) == 2
    assert "no such indexed dataset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_contexts_and_choices_are_not_truncated_or_padded_by_the_tokenizer_file(tmp_path):
    # A BERT-style tokenizer.json saved with truncation and padding to 16 (issue 10): each context and choice is
    # scored whole and unpadded, equal to scoring an independent whole-text encode.
    from bert_tokenizer import MAX_LENGTH, reference_ids, write_bert_checkpoint

    ckpt, model = write_bert_checkpoint(tmp_path)
    tok_dir = ckpt / "tokenizer"
    eod = load_tokenizer(tok_dir).eod_id
    examples = [{"context": "x", "choices": ["yes", "no"], "gold": 0},
                {"context": "the list of items is returned in the order given by the key, " * 2,
                 "choices": ["sorted", "in the order of the arguments that the function was called with"], "gold": 1}]
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps({"type": "multiple_choice", **e}) + "\n" for e in examples))
    out = tmp_path / "out"
    assert load_tool("eval").main(["--checkpoint", str(ckpt), "--tasks", str(task), "--out", str(out)]) == 0
    records = [json.loads(l) for l in (out / "predictions" / "mc.jsonl").read_text().splitlines()]
    requests = [([eod] + reference_ids(tok_dir, e["context"]), reference_ids(tok_dir, " " + c))
                for e in examples for c in e["choices"]]
    assert min(len(r[0]) for r in requests) == 2 and max(len(r[0]) for r in requests) > MAX_LENGTH
    expected = [s.logprob for s in score_continuations(model, requests)]
    assert [x for r in records for x in r["logliks"]] == pytest.approx(expected, abs=1e-4)


def _raw_prefix(prefix: Path, docs: list[list[int]]) -> Path:
    """A Megatron-format uint16 prefix written byte by byte from the format's definition (docs/format.md)."""
    lengths = [len(d) for d in docs]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * 2 if docs else np.zeros(0, np.int64)
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1)
    prefix.with_suffix(".idx").write_bytes(header + np.asarray(lengths, np.int32).tobytes() + pointers.tobytes()
                                           + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    prefix.with_suffix(".bin").write_bytes(np.asarray([t for d in docs for t in d], np.uint16).tobytes())
    return prefix


@pytest.mark.parametrize("docs", [[], [[5]]], ids=["no tokens", "one token"])
def test_perplexity_of_a_prefix_with_nothing_to_predict_is_an_error(setup, tmp_path, capsys, docs):
    ckpt, _, model = setup
    prefix = _raw_prefix(tmp_path / "empty", docs)
    assert IndexedDataset(prefix).num_tokens == len(docs)  # a valid prefix, just nothing to predict in it
    out = tmp_path / "o"
    assert load_tool("eval").main(["--checkpoint", str(ckpt), "--perplexity", str(prefix), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}: {len(docs)} tokens; perplexity needs at least 2" in err and "ppl" not in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="perplexity needs at least 2"):  # the library call refuses too
        run_perplexity(model, str(prefix), EvalSettings(), seq_len=64)


def test_chat_without_the_template_tokens_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    # The setup tokenizer has no <|im_start|>/<|im_end|>: --chat refuses with one line (the --chat prompts
    # themselves are checked in tests/eval/test_eval_chat.py).
    ckpt, valid, _ = setup
    out = tmp_path / "out"
    assert load_tool("eval").main(["--checkpoint", str(ckpt), "--tasks", str(TASKS[0]), "--chat", "--out",
                                   str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat:") and "--chat-tokens" in err and not out.exists()

