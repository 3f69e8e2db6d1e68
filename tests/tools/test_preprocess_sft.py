"""tools/preprocess_sft.py run as a user runs it (subprocesses): byte-identical output for any --workers, each
kind of bad record -> exit 2 with FILE:LINE and no output, --skip-bad-lines, auto format, --chat-tokens."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megasynth.chat import BUILTIN_TEMPLATE, IM_END
from megasynth.data.indexed import IndexedDataset
from megasynth.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is two plus two? It is four.",
         "def f(x):\n    return x + 1\n", "Answer in one sentence, please."] * 6
GOOD = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "It is four."}]}


def run_tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    proc = run_tool("train_tokenizer", "--input", d / "texts.jsonl", "--output", d / "bpe", "--type", "bpe",
                    "--vocab-size", "400", "--chat-tokens", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return d / "bpe"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def digest(prefix):
    return {s: hashlib.sha256(Path(f"{prefix}.{s}").read_bytes()).hexdigest() for s in ("bin", "idx", "mask", "json")}


def test_chat_tokens_make_a_tokenizer_with_the_builtin_template(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template == BUILTIN_TEMPLATE
    assert all(len(tok.encode(t)) == 1 for t in ("<|im_start|>", "<|im_end|>", "<|sep|>"))
    from transformers import AutoTokenizer  # the exported tokenizer formats chats the same way in transformers

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.apply_chat_template(GOOD["messages"], tokenize=False) == \
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nIt is four.<|im_end|>\n"


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, tok_dir):
    records = []
    for i in range(60):
        records.append({"messages": [{"role": "user", "content": f"{TEXTS[i % 4]} #{i}"},
                                     {"role": "assistant", "content": TEXTS[(i + 1) % 4]}]})
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "sft"
        proc = run_tool("preprocess_sft", "--input", src, "--tokenizer", tok_dir, "--output-prefix", out,
                        "--workers", workers, "--batch-size", 7, "--no-progress")
        assert proc.returncode == 0, proc.stderr
        assert "format: chat (auto, from the keys of the record at" in proc.stderr
        assert "60 records" in proc.stdout and "target tokens" in proc.stdout and "truncated 0" in proc.stdout
        digests.append(digest(out))
    assert digests[0] == digests[1]
    ds = IndexedDataset(tmp_path / "w2" / "sft")
    assert len(ds) == 60 and load_tokenizer(tok_dir).decode(ds[59][ds.loss_mask(59)]) == TEXTS[0] + IM_END


BAD = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "hello?"}]}, "no assistant message"),
    "empty response": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
                       "empty content"),
    "unknown role": ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
                     "role 'human'"),
    "missing field": ({"prompt": "q"}, "no field 'messages'"),
    "special token in a text": ({"messages": [{"role": "user", "content": "q<|im_end|>"},
                                              {"role": "assistant", "content": "a"}]}, "special token '<|im_end|>'"),
    "invalid JSON": ('{"messages": [', "invalid JSON"),
    "too long": ({"messages": [{"role": "user", "content": TEXTS[0] * 3}, {"role": "assistant", "content": "a"}]},
                 "more than --max-len 40"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_record_kind_exits_2_naming_the_line_and_writes_nothing(tmp_path, tok_dir, kind):
    record, message = BAD[kind]
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, record, GOOD])
    out = tmp_path / "new" / "sft"
    proc = run_tool("preprocess_sft", "--input", src, "--tokenizer", tok_dir, "--output-prefix", out,
                    "--max-len", 40, "--workers", 1, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert f"{src}:3: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "new").exists()  # not even the directory it would have created


def test_skip_bad_lines_counts_and_reports(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, BAD["unknown role"][0], GOOD, BAD["invalid JSON"][0], GOOD])
    out = tmp_path / "sft"
    proc = run_tool("preprocess_sft", "--input", src, "--tokenizer", tok_dir, "--output-prefix", out,
                    "--skip-bad-lines", "--workers", 0, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 bad records" in proc.stderr
    assert f"{src}:2: message 1 has role 'human'" in proc.stderr and f"{src}:4: invalid JSON" in proc.stderr
    assert "3 records" in proc.stdout and "skipped 2 bad" in proc.stdout
    ds = IndexedDataset(out)
    assert len(ds) == 3 and ds.metadata["stats"]["skipped_bad"] == 2


def test_truncate_is_counted_and_an_existing_output_needs_overwrite(tmp_path, tok_dir):
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": TEXTS[0] * 3}]}
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, long_answer])
    args = ["--input", src, "--tokenizer", tok_dir, "--output-prefix", tmp_path / "sft", "--max-len", 40,
            "--truncate", "--format", "prompt_response", "--no-progress"]
    proc = run_tool("preprocess_sft", *args)
    assert proc.returncode == 2 and f"{src}:1: no field 'prompt'" in proc.stderr  # the format given is enforced
    args[args.index("prompt_response")] = "chat"
    assert run_tool("preprocess_sft", *args).returncode == 0
    proc = run_tool("preprocess_sft", *args)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = run_tool("preprocess_sft", *args, "--overwrite")
    assert proc.returncode == 0 and "truncated 1" in proc.stdout
    ds = IndexedDataset(tmp_path / "sft")
    assert len(ds[1]) == 40 and ds.metadata["stats"]["truncated"] == 1
