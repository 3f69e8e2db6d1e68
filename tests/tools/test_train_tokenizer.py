"""tools/train_tokenizer.py run as a user runs it: both types train, load back, and transformers reads the BPE."""

import gzip
import json
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from megasynth.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [topics[k] for k in sorted(topics)][:50]
PROBE = "The  assert statement\n\tdef f(x):  # ünïcödé 🎉\n"


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in TEXTS).encode()))
    return path


def test_bpe_loads_here_and_in_transformers(tmp_path, corpus):
    out = tmp_path / "bpe"
    proc = run_tool("--input", corpus, "--json-key", "body", "--output", out, "--type", "bpe", "--vocab-size", 700,
                    "--special-tokens", "<|sep|>", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"trained on {len(TEXTS)} documents" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(out)
    assert (tok.type, tok.vocab_size, tok.eod_id, tok.bos_id) == ("huggingface", 700, 0, None)
    assert tok.decode(tok.encode(PROBE)) == PROBE
    assert tok.decode([1]) == "<|sep|>" and 1 in tok.encode("a <|sep|> b")  # one id, never split, after EOD

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eod_id
    assert hf.encode(PROBE) == tok.encode(PROBE)  # transformers adds no specials either
    assert hf.decode(hf.encode(PROBE)) == PROBE


def test_sentencepiece_loads_and_round_trips(tmp_path, corpus):
    out = tmp_path / "sp"
    proc = run_tool("--input", corpus, "--json-key", "body", "--output", out, "--type", "sentencepiece",
                    "--vocab-size", 600, "--max-documents", 20, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "trained on 20 documents" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer.vocab"]
    tok = load_tokenizer(out)
    assert (tok.type, tok.vocab_size, tok.eod_id, tok.bos_id) == ("sentencepiece", 600, 2, 1)
    assert tok.decode(tok.encode(PROBE)) == PROBE  # identity normalization + byte fallback: lossless


def test_bad_input_exits_2_with_file_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": 3}\n')
    proc = run_tool("--input", src, "--output", tmp_path / "tok", "--type", "bpe", "--vocab-size", 300)
    assert proc.returncode == 2
    assert f"{src}:2: 'text' is a number, expected a string" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and not (tmp_path / "tok").exists()
    proc = run_tool("--input", tmp_path / "none.jsonl", "--output", tmp_path / "tok", "--type", "bpe",
                    "--vocab-size", 300)
    assert proc.returncode == 2 and f"{tmp_path / 'none.jsonl'}: no such file or directory" in proc.stderr
    proc = run_tool("--input", src, "--output", tmp_path / "tok", "--type", "bpe", "--vocab-size", 100)
    assert proc.returncode == 2 and "below the 256 byte symbols" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no temp directories left


def test_a_vocabulary_the_corpus_cannot_fill_is_a_warning_with_the_number(tmp_path, corpus):
    out = tmp_path / "big"
    proc = run_tool("--input", corpus, "--json-key", "body", "--output", out, "--type", "bpe", "--vocab-size", 32000,
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    got = load_tokenizer(out).vocab_size
    assert got < 32000
    assert f"warning: asked for --vocab-size 32,000 but the corpus gave only {got:,} ids" in proc.stderr
    proc = run_tool("--input", corpus, "--json-key", "body", "--output", tmp_path / "fits", "--type", "bpe",
                    "--vocab-size", 700, "--no-progress")
    assert proc.returncode == 0 and "warning" not in proc.stderr


def test_an_existing_tokenizer_needs_overwrite_and_only_tokenizer_files_are_replaced(tmp_path, corpus):
    out = tmp_path / "tok"
    base = ("--input", corpus, "--json-key", "body", "--output", out, "--vocab-size", 700, "--no-progress")
    assert run_tool(*base, "--type", "bpe", "--chat-tokens").returncode == 0
    (out / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_tool(*base, "--type", "sentencepiece")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--overwrite" in proc.stderr and str(out) in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite: a SentencePiece model replaces the BPE files (a stale tokenizer.json would shadow it); the
    # user's own file stays.
    assert run_tool(*base, "--type", "sentencepiece", "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "tokenizer.model", "tokenizer.vocab"]
    assert (out / "NOTES.md").read_text() == "mine" and load_tokenizer(out).type == "sentencepiece"
