"""SBP stage 3 (megasynth.synth.sbp.pair_dataset) on a real tokenizer and corpus: the same sequences as an SFT `pair`
record, the layout and mask built independently from the tokenizer, limits, both directions, every bad input,
and stage 4: examples/sbp/synthesizer.toml fine-tunes a checkpoint on the result for a couple of steps."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sbp_helpers import CORPUS_TEXTS, make_corpus, make_synthesizer, make_tokenizer, write_jsonl

from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.data.prefix import OutputExistsError
from megasynth.data.sft import preprocess_sft
from megasynth.metrics import read_metrics
from megasynth.synth.corpus import CorpusError
from megasynth.synth.sbp.pair_dataset import PairDatasetError, make_pair_dataset
from megasynth.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [(0, 1), (2, 3), (5, 4), (7, 7), (11, 0)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    tok = make_tokenizer(d / "tok")
    return tok, make_corpus(d / "data" / "real", tok), d


def write_pairs(path, rows):
    seeds, targets = zip(*rows) if rows else ((), ())
    table = pa.table({"seed": pa.array(seeds, pa.int64()), "target": pa.array(targets, pa.int64()),
                      "similarity": pa.array([0.9] * len(rows), pa.float32())})
    pq.write_table(table, path)
    return path


def expected(tok, seed_text, target_text, l1=None, l2=None):
    """The pair sequence from the tokenizer alone: seed ids, <|sep|>, target ids, EOD; mask on target (+ EOD)."""
    s, t = tok.encode(seed_text), tok.encode(target_text)
    cut = l2 is not None and len(t) > l2
    s, t = s[:l1] if l1 else s, t[:l2] if l2 else t
    sep = tok.encode("<|sep|>")
    assert len(sep) == 1
    return s + sep + t + [tok.eod_id], [False] * (len(s) + 1) + [True] * len(t) + [not cut]


def read_all(prefix):
    ds = IndexedDataset(prefix)
    return [(ds[i].tolist(), ds.loss_mask(i).tolist()) for i in range(len(ds))]


def test_same_sequences_as_an_sft_pair_record(inputs, tmp_path):
    tok, corpus, _ = inputs
    pairs = write_pairs(tmp_path / "pairs.parquet", PAIRS)
    make_pair_dataset(pairs, corpus, tmp_path / "p", progress=False)
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"source": CORPUS_TEXTS[s], "target": CORPUS_TEXTS[t]}
                                                 for s, t in PAIRS])
    preprocess_sft([src], tmp_path / "sft", tok.path, fmt="pair", progress=False)
    ours, sft = read_all(tmp_path / "p"), read_all(tmp_path / "sft")
    assert ours == sft
    assert ours == [expected(tok, CORPUS_TEXTS[s], CORPUS_TEXTS[t]) for s, t in PAIRS]
    for name in ("p", "sft"):
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["sft"]["pair_separator"] == {"text": "<|sep|>", "id": tok.encode("<|sep|>")[0]}


def test_limits_both_directions_sidecar_and_rerun_bytes(inputs, tmp_path):
    tok, corpus, _ = inputs
    pairs = write_pairs(tmp_path / "pairs.parquet", PAIRS)
    counts = make_pair_dataset(pairs, corpus, tmp_path / "a", max_seed_tokens=3, max_target_tokens=4,
                               both_directions=True, progress=False)
    want = []
    for s, t in PAIRS:
        want += [expected(tok, CORPUS_TEXTS[s], CORPUS_TEXTS[t], 3, 4),
                 expected(tok, CORPUS_TEXTS[t], CORPUS_TEXTS[s], 3, 4)]
    assert read_all(tmp_path / "a") == want
    assert not any(mask[-1] for _, mask in want)  # every target is cut at 4: its EOD is context
    assert counts["sequences"] == 10 and counts["truncated_targets"] == 10 and counts["skipped_empty"] == 0
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["pairs"]["sha256"] == hashlib.sha256(pairs.read_bytes()).hexdigest()
    assert meta["pairs"]["rows"] == 5
    assert meta["corpus"]["idx_sha256"] == IndexedDataset(corpus).idx_sha256
    assert meta["limits"] == {"max_seed_tokens": 3, "max_target_tokens": 4, "both_directions": True}
    assert meta["stats"]["target_tokens"] == sum(sum(m) for _, m in want)
    make_pair_dataset(pairs, corpus, tmp_path / "b", max_seed_tokens=3, max_target_tokens=4,
                      both_directions=True, progress=False)
    for ext in ("bin", "idx", "mask"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
    sidecars = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab"]
    for m in sidecars:
        m["loss_mask"].pop("file")  # the mask's own name
    assert sidecars[0] == sidecars[1]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_pair_dataset(pairs, corpus, tmp_path / "a", progress=False)
    make_pair_dataset(pairs, corpus, tmp_path / "a", overwrite=True, progress=False)
    assert len(IndexedDataset(tmp_path / "a")) == 5


def test_pairs_with_an_empty_document_are_skipped_and_counted(inputs, tmp_path):
    tok, _, _ = inputs
    prefix = tmp_path / "corpus"
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"tokenizer": tok.identity(), "vocab_size": tok.vocab_size,
                                                           "eod_id": tok.eod_id}) as w:
        w.add_documents([tok.encode("one two", append_eod=True), [tok.eod_id], tok.encode("three", append_eod=True)])
    pairs = write_pairs(tmp_path / "pairs.parquet", [(0, 1), (1, 2), (0, 2)])
    counts = make_pair_dataset(pairs, prefix, tmp_path / "p", progress=False)
    assert counts["skipped_empty"] == 2 and counts["sequences"] == 1
    assert read_all(tmp_path / "p") == [expected(tok, "one two", "three")]


@pytest.mark.parametrize("case, message", [
    ("out_of_range", r"pairs.parquet: row 2: target 12 is not a document of .*real \(12 documents\)"),
    ("negative", r"pairs.parquet: row 0: seed -1 is not a document"),
    ("missing_column", r"pairs.parquet: no column 'target'"),
    ("float_column", r"pairs.parquet: column 'seed' is double, expected int64"),
    ("null", r"pairs.parquet: row 1: seed is null"),
    ("empty", r"pairs.parquet: the pair table has no rows; pass --allow-empty"),
    ("not_parquet", r"pairs.parquet: not a readable Parquet file"),
    ("other_corpus", r"pairs.json: the pairs were built from a corpus with .idx sha256 0123456789ab"),
    ("other_count", r"pairs.json: the pairs were built from embeddings of 13 documents, but .*real has 12"),
    ("stale_json", r"pairs.json: describes another pair table \(sha256 0123456789ab"),
])
def test_bad_pair_tables_are_refused_naming_file_and_row(inputs, tmp_path, case, message):
    _, corpus, _ = inputs
    path = tmp_path / "pairs.parquet"
    if case == "out_of_range":
        write_pairs(path, [(0, 1), (1, 2), (3, 12)])
    elif case == "negative":
        write_pairs(path, [(-1, 1)])
    elif case == "missing_column":
        pq.write_table(pa.table({"seed": pa.array([1], pa.int64())}), path)
    elif case == "float_column":
        pq.write_table(pa.table({"seed": pa.array([1.0]), "target": pa.array([2], pa.int64())}), path)
    elif case == "null":
        pq.write_table(pa.table({"seed": pa.array([1, None], pa.int64()), "target": pa.array([2, 3], pa.int64())}),
                       path)
    elif case == "empty":
        write_pairs(path, [])
    elif case == "not_parquet":
        path.write_text("seed,target\n1,2\n")
    elif case == "other_corpus":
        write_pairs(path, [(0, 1)])
        (tmp_path / "pairs.json").write_text(json.dumps({"corpus": {"prefix": "x", "idx_sha256": "0123456789ab" * 5}}))
    elif case == "other_count":
        write_pairs(path, [(0, 1)])
        (tmp_path / "pairs.json").write_text(json.dumps({"embeddings": {"num_documents": 13}, "corpus": None}))
    elif case == "stale_json":
        write_pairs(path, [(0, 1)])
        (tmp_path / "pairs.json").write_text(json.dumps({"files": {"parquet": {"sha256": "0123456789ab" * 5}}}))
    with pytest.raises(CorpusError, match=message):
        make_pair_dataset(path, corpus, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out*"))


def test_empty_table_with_allow_empty_writes_an_empty_prefix(inputs, tmp_path):
    _, corpus, _ = inputs
    make_pair_dataset(write_pairs(tmp_path / "pairs.parquet", []), corpus, tmp_path / "p", allow_empty=True,
                      progress=False)
    assert len(IndexedDataset(tmp_path / "p")) == 0


def test_tokenizer_without_separator_or_of_another_corpus_is_refused(inputs, tmp_path):
    _, corpus, _ = inputs
    plain = make_tokenizer(tmp_path / "plain", separator=False)
    plain_corpus = make_corpus(tmp_path / "plain_corpus", plain)
    pairs = write_pairs(tmp_path / "pairs.parquet", [(0, 1)])
    with pytest.raises(TokenizerError, match=r"plain.*<\|sep\|>.*tools/train_tokenizer.py --chat-tokens"):
        make_pair_dataset(pairs, plain_corpus, tmp_path / "p", progress=False)
    with pytest.raises(TokenizerError, match=r"real: tokenized with .*tok.*, not with the tokenizer .*plain"):
        make_pair_dataset(pairs, corpus, tmp_path / "p", tokenizer=plain.path, progress=False)
    with pytest.raises(PairDatasetError, match="max_seed_tokens must be >= 1"):
        make_pair_dataset(pairs, corpus, tmp_path / "p", max_seed_tokens=0, progress=False)


def test_synthesizer_config_tunes_a_checkpoint_on_the_pairs(inputs, tmp_path):
    """Stage 4: examples/sbp/synthesizer.toml parses and trains a couple of steps from a checkpoint (tiny model)."""
    from megasynth.train import main as train_main

    tok, corpus, _ = inputs
    pairs = write_pairs(tmp_path / "pairs.parquet", PAIRS * 4)
    make_pair_dataset(pairs, corpus, tmp_path / "pairs", max_seed_tokens=10, max_target_tokens=12, progress=False)
    base = make_synthesizer(tmp_path / "base", tok, corpus)
    run_dir = tmp_path / "synthesizer"
    rc = train_main(["--config", str(ROOT / "examples/sbp/synthesizer.toml"),
                     f"--train.init_from={base}", f"--train.run_dir={run_dir}",
                     f'--data.sources=[{{path = "{tmp_path / "pairs"}", packing = "pack"}}]',
                     f"--model.vocab_size={tok.vocab_size}", "--model.dim=32", "--model.n_layers=2",
                     "--model.n_heads=2", "--model.n_kv_heads=1", "--model.ffn_dim=64", "--model.max_seq_len=48",
                     "--model.tie_embeddings=false", "--data.seq_len=32", "--train.steps=2",
                     "--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.checkpoint_every=0",
                     "--train.log_every=1"])
    assert rc == 0
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert (run_dir / "tokenizer").is_dir()  # copied from the pair prefix's sidecar: synthesize finds it there
