"""SBP with a pretrained tokenizer that has no <|sep|>. make_pair_dataset, preprocess_sft
--format pair and synthesize take --separator (any token that is one id, not the EOD); a separator that is not
one id is refused with exit 2 and one line naming it and the tokenizer; the pair prefix's sidecar records the
separator, and synthesize prompts with the one the synthesizer was tuned on (read from the sidecar of the pair
data its checkpoint's config names), refusing a different --separator. Also: --pairs given the stem of a pair
table names the missing file and the one that exists."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bert_tokenizer import write_bert_tokenizer
from helpers import load_tool
from sbp_helpers import CORPUS_TEXTS, make_corpus, make_synthesizer

from megasynth.data.indexed import IndexedDataset
from megasynth.tokenizer import train_bpe_tokenizer

RESERVED = "<|reserved_special_token_0|>"  # what a Llama-3-style vocabulary has spare


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A BPE shaped like a pretrained one: EOD plus a reserved special token, no <|sep|> and no chat tokens."""
    d = tmp_path_factory.mktemp("pretrained")
    tok = train_bpe_tokenizer(CORPUS_TEXTS * 4, d / "tok", vocab_size=320, special_tokens=(RESERVED,))
    corpus = make_corpus(d / "data" / "real", tok)
    rows = [(i, (i + 1) % len(CORPUS_TEXTS)) for i in range(len(CORPUS_TEXTS))]
    pq.write_table(pa.table({"seed": pa.array([r[0] for r in rows], pa.int64()),
                             "target": pa.array([r[1] for r in rows], pa.int64())}), d / "pairs.parquet")
    sha = hashlib.sha256((d / "pairs.parquet").read_bytes()).hexdigest()  # build_pairs.py writes both
    (d / "pairs.json").write_text(json.dumps({"format": "megasynth-pairs", "files": {"parquet": {"sha256": sha}}}))
    return tok, corpus, d


def pair_args(d: Path, corpus: str, out, *extra) -> list[str]:
    return ["--pairs", str(d / "pairs.parquet"), "--corpus", corpus, "--output-prefix", str(out),
            "--max-seed-tokens", "6", "--max-target-tokens", "8", "--no-progress", *extra]


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_make_pair_dataset_and_synthesize_with_a_reserved_separator(pretrained, tmp_path, capsys):
    tok, corpus, d = pretrained
    make_pairs, synth = load_tool("make_pair_dataset"), load_tool("synthesize")
    sep_id = tok.encode(RESERVED)[0]
    # Without --separator: <|sep|> is not one token of this tokenizer.
    assert make_pairs.main(pair_args(d, corpus, tmp_path / "no")) == 2
    line = last_line(capsys)
    assert "'<|sep|>' is not one token" in line and tok.path in line and "--separator" in line
    for bad in ("<|nope|>", "<|endoftext|>"):  # split into several ids / the EOD itself
        assert make_pairs.main(pair_args(d, corpus, tmp_path / "no", "--separator", bad)) == 2
        assert repr(bad) in last_line(capsys)
    assert not list(tmp_path.glob("no*"))

    pairs = tmp_path / "data" / "sbp"
    assert make_pairs.main(pair_args(d, corpus, pairs, "--separator", RESERVED)) == 0
    meta = json.loads(Path(f"{pairs}.json").read_text())
    assert meta["sft"]["pair_separator"] == {"text": RESERVED, "id": sep_id}
    ds = IndexedDataset(str(pairs))
    assert all(ds[i].tolist().count(sep_id) == 1 for i in range(len(ds)))

    # The synthesizer tuned on that prefix (its config names it): synthesize finds the separator there.
    run = make_synthesizer(tmp_path / "run", tok, str(pairs), max_seq_len=32)
    common = ["--checkpoint", str(run), "--corpus", corpus, "--num-docs", "4", "--shard-docs", "4",
              "--max-seed-tokens", "6", "--max-new-tokens", "8", "--device", "cpu", "--no-progress"]
    assert synth.main([*common, "--output-prefix", str(tmp_path / "syn")]) == 0
    capsys.readouterr()
    settings = json.loads((tmp_path / "syn.json").read_text())["synthesis"]["settings"]
    assert (settings["separator"], settings["separator_id"]) == (RESERVED, sep_id)
    # The same one given explicitly is fine; another one is refused, naming both.
    assert synth.main([*common, "--output-prefix", str(tmp_path / "syn2"), "--separator", RESERVED]) == 0
    capsys.readouterr()
    assert synth.main([*common, "--output-prefix", str(tmp_path / "syn3"), "--separator", "<|endoftext|>"]) == 2
    line = last_line(capsys)
    assert "'<|endoftext|>' is not the separator the synthesizer was tuned on" in line and RESERVED in line
    assert not list(tmp_path.glob("syn3*"))


def test_synthesize_without_a_recorded_separator(pretrained, tmp_path, capsys):
    tok, corpus, _ = pretrained
    synth = load_tool("synthesize")
    run = make_synthesizer(tmp_path / "run", tok, corpus, max_seq_len=32)  # tuned on data without a pair sidecar
    common = ["--checkpoint", str(run), "--corpus", corpus, "--num-docs", "2", "--shard-docs", "2",
              "--max-seed-tokens", "4", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert synth.main([*common, "--output-prefix", str(tmp_path / "a")]) == 2
    line = last_line(capsys)
    assert "'<|sep|>' is not one token" in line and "--separator" in line
    assert synth.main([*common, "--output-prefix", str(tmp_path / "b"), "--separator", RESERVED]) == 0
    settings = json.loads((tmp_path / "b.json").read_text())["synthesis"]["settings"]
    assert settings["separator"] == RESERVED


def test_preprocess_sft_pair_with_a_wordpiece_separator(tmp_path, capsys):
    tok_dir = write_bert_tokenizer(tmp_path / "bert")  # eos [SEP]; no <|sep|>
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"source": a, "target": b}) + "\n"
                           for a, b in zip(CORPUS_TEXTS[::2], CORPUS_TEXTS[1::2])))
    tool = load_tool("preprocess_sft")
    base = ["--input", str(src), "--tokenizer", str(tok_dir), "--format", "pair", "--no-progress"]
    assert tool.main([*base, "--output-prefix", str(tmp_path / "no")]) == 2
    assert "'<|sep|>' is not one token" in capsys.readouterr().err
    assert tool.main([*base, "--output-prefix", str(tmp_path / "no"), "--separator", "[SEP]"]) == 2  # the EOD
    assert "end-of-document" in capsys.readouterr().err
    assert tool.main([*base, "--output-prefix", str(tmp_path / "ok"), "--separator", "[CLS]"]) == 0
    meta = json.loads((tmp_path / "ok.json").read_text())
    cls = meta["sft"]["pair_separator"]
    assert cls["text"] == "[CLS]" and IndexedDataset(str(tmp_path / "ok"))[0].tolist().count(cls["id"]) == 1


def test_pairs_stem_names_the_missing_file(pretrained, tmp_path, capsys):
    _, corpus, d = pretrained
    args = ["--pairs", str(d / "pairs"), "--corpus", corpus, "--output-prefix", str(tmp_path / "out"),
            "--separator", RESERVED, "--no-progress"]
    assert load_tool("make_pair_dataset").main(args) == 2
    assert last_line(capsys) == f"error: {d / 'pairs'}: no such file; did you mean {d / 'pairs'}.parquet?"
