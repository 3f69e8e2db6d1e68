"""tools/merge_datasets.py and tools/inspect_dataset.py, run as a user runs them (subprocesses)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from megasynth.data.indexed import IndexedDataset, IndexedDatasetWriter
from megasynth.data.preprocess import preprocess
from megasynth.data.readers import ReaderOptions
from megasynth.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def run_tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def write(prefix, docs, dtype=np.uint16, metadata=None):
    with IndexedDatasetWriter(prefix, dtype, metadata=metadata) as w:
        w.add_documents([np.asarray(d) for d in docs])
    return str(prefix)


def test_merge_inputs_and_input_dir(tmp_path):
    shards = tmp_path / "shards"
    meta = {"tokenizer": {"sha256": "t1"}, "vocab_size": 500}
    # Named so that sorted order (a, b, c) differs from creation order.
    write(shards / "b", [[4, 5], [6]], metadata=meta)
    write(shards / "a", [[1, 2, 3]], metadata=meta)
    write(shards / "c", [[], [7, 8, 9, 10]], metadata=meta)

    proc = run_tool("merge_datasets.py", "--input-dir", shards, "--output", tmp_path / "all", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 prefixes" in proc.stdout and "5 documents, 10 tokens" in proc.stdout
    merged = IndexedDataset(tmp_path / "all")
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2, 3], [4, 5], [6], [], [7, 8, 9, 10]]
    assert [Path(e["prefix"]).name for e in merged.metadata["inputs"]] == ["a", "b", "c"]

    proc = run_tool("merge_datasets.py", "--inputs", shards / "c", shards / "a", "--output", tmp_path / "ca")
    assert proc.returncode == 0, proc.stderr
    ca = IndexedDataset(tmp_path / "ca")
    assert [ca[i].tolist() for i in range(len(ca))] == [[], [7, 8, 9, 10], [1, 2, 3]]

    # Re-running with the output inside the input dir does not merge the output into itself.
    proc = run_tool("merge_datasets.py", "--input-dir", shards, "--output", shards / "all", "--quiet")
    assert proc.returncode == 0 and len(IndexedDataset(shards / "all")) == 5


def test_merge_bad_inputs_exit_2(tmp_path):
    a = write(tmp_path / "a", [[1]], metadata={"tokenizer": {"sha256": "t1"}})
    b = write(tmp_path / "b", [[2]], metadata={"tokenizer": {"sha256": "t2"}})
    proc = run_tool("merge_datasets.py", "--inputs", a, b, "--output", tmp_path / "o")
    assert proc.returncode == 2 and "b.json: tokenizer hash 't2' differs" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_tool("merge_datasets.py", "--inputs", a, tmp_path / "missing", "--output", tmp_path / "o")
    assert proc.returncode == 2 and "missing.idx: no such file" in proc.stderr
    proc = run_tool("merge_datasets.py", "--input-dir", tmp_path / "nodir", "--output", tmp_path / "o")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))


def test_inspect_prints_header_sidecar_lengths_and_docs(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n) for n in (1, 3, 3, 900, 40, 0)]
    prefix = write(tmp_path / "x", docs, metadata={"vocab_size": 1000, "created_by": "test"})
    proc = run_tool("inspect_dataset.py", prefix, "--doc", 1, "--doc", -3, "--max-tokens", 5)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "version:     1" in out and "dtype:       uint16 (code 8)" in out
    assert "sequences:   6" in out and f"tokens:      {sum(d.size for d in docs):,}" in out
    assert '"created_by": "test"' in out and '"vocab_size": 1000' in out
    # lengths 0, 1, 3, 3, 40, 900: median (3 + 3) / 2, mean 947 / 6
    assert "min 0  mean 157.8  median 3.0" in out and "max 900" in out
    assert "[2, 4)" in out and "[512, 1,024)" in out
    assert f"ids: {docs[1].tolist()}" in out
    assert f"ids: {docs[3][:5].tolist()} ... (895 more)" in out
    assert "ids only" in out  # no tokenizer recorded: a note, not a failure


def test_inspect_megatron_style_prefix_without_sidecar(tmp_path):
    prefix = write(tmp_path / "m", [[1, 2]])
    os.remove(f"{prefix}.json")
    proc = run_tool("inspect_dataset.py", prefix, "--doc", 0, "--tokenizer", tmp_path / "none.model")
    assert proc.returncode == 0, proc.stderr
    assert "sidecar: none" in proc.stdout and "ids: [1, 2]" in proc.stdout and "not found: ids only" in proc.stdout


def test_inspect_bad_input_exit_2(tmp_path):
    proc = run_tool("inspect_dataset.py", tmp_path / "missing")
    assert proc.returncode == 2 and "missing.idx: no such file" in proc.stderr
    prefix = write(tmp_path / "x", [[1, 2, 3]])
    proc = run_tool("inspect_dataset.py", prefix, "--doc", 1)
    assert proc.returncode == 2 and "--doc 1 out of range (1 documents)" in proc.stderr
    good_sidecar = open(f"{prefix}.json").read()
    open(f"{prefix}.json", "w").write('{\n  "format": "megasynth-indexed",\n  "num_tokens": 3,,\n}')
    proc = run_tool("inspect_dataset.py", prefix)
    assert proc.returncode == 2 and "x.json:3: invalid JSON" in proc.stderr  # FILE:LINE of the stray comma
    open(f"{prefix}.json", "w").write(good_sidecar)
    os.truncate(f"{prefix}.idx", 40)
    proc = run_tool("inspect_dataset.py", prefix)
    # one sequence: 34 header + 4 length + 8 pointer + 2 * 8 document indices = 62 bytes
    assert proc.returncode == 2 and "x.idx: truncated: expected 62 bytes, found 40" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_decodes_with_the_tokenizer_the_sidecar_records(tmp_path):
    # A real pipeline in miniature: a byte-level BPE trained on a few KB, a JSONL corpus preprocessed with it,
    # then inspect_dataset.py given only the prefix (no --tokenizer): it must find the tokenizer via the sidecar.
    docs = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n" * 3 for i in range(40)]
    docs[0] = "First document.\n\tIndented line with  two spaces, ünïcödé and an emoji 🎉."
    docs[-1] = "The last one: <not special>, 12345."
    tok = train_bpe_tokenizer(docs, tmp_path / "tok", vocab_size=400)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    preprocess([corpus], tmp_path / "data" / "x", tmp_path / "tok", options=ReaderOptions(), workers=0, progress=False)

    proc = run_tool("inspect_dataset.py", tmp_path / "data" / "x", "--doc", 0, "--doc", -1, "--max-tokens", 0)
    assert proc.returncode == 0, proc.stderr
    assert f"tokenizer: decoded with {tok.path}" in proc.stdout  # the sidecar's tokenizer.path, absolute
    texts = [ast.literal_eval(line.removeprefix("  text: ")) for line in proc.stdout.splitlines()
             if line.startswith("  text: ")]
    # Each document was stored with the EOD id appended; its decoded text is the end-of-text token.
    eod_text = tok.decode([tok.eod_id])
    assert eod_text == "<|endoftext|>"
    assert texts == [docs[0] + eod_text, docs[-1] + eod_text]


def write_masked(prefix, docs, masks, metadata=None):
    with IndexedDatasetWriter(prefix, np.uint16, metadata=metadata, loss_mask=True) as w:
        w.add_documents([np.asarray(d) for d in docs], loss_masks=[np.asarray(m, dtype=bool) for m in masks])
    return str(prefix)


def test_merge_carries_loss_masks(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 900, size=int(n)) for n in rng.integers(0, 25, size=30)]
    masks = [rng.random(d.size) < 0.4 for d in docs]
    a = write_masked(tmp_path / "a", docs[:13], masks[:13])
    b = write_masked(tmp_path / "b", docs[13:], masks[13:])
    proc = run_tool("merge_datasets.py", "--inputs", a, b, "--output", tmp_path / "ab", "--quiet")
    assert proc.returncode == 0, proc.stderr
    targets = int(sum(m.sum() for m in masks))
    assert f"loss mask {targets:,} targets" in proc.stdout
    ab = IndexedDataset(tmp_path / "ab")
    assert ab.has_loss_mask and ab.metadata["loss_mask"]["num_targets"] == targets
    for i, (d, m) in enumerate(zip(docs, masks)):
        np.testing.assert_array_equal(ab[i], d)
        np.testing.assert_array_equal(ab.loss_mask(i), m)
    assert [e["loss_mask"] for e in ab.metadata["inputs"]] == ["file", "file"]
    ab.verify()

    # Masked with unmasked: refused unless the unmasked tokens are to count as targets.
    plain = write(tmp_path / "plain", [[1, 2, 3], [4]])
    proc = run_tool("merge_datasets.py", "--inputs", a, plain, "--output", tmp_path / "mix", "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"{plain}: has no loss mask but {a} has one; pass --unmasked-as-all-true "
                                        "(unmasked_as_all_true=True) to treat every token of the unmasked inputs as a target"]
    assert not list(tmp_path.glob("mix*")) and not list(tmp_path.glob(".mix*"))
    proc = run_tool("merge_datasets.py", "--inputs", plain, a, "--output", tmp_path / "mix", "--quiet",
                    "--unmasked-as-all-true")
    assert proc.returncode == 0, proc.stderr
    mix = IndexedDataset(tmp_path / "mix")
    assert [mix.loss_mask(i).tolist() for i in range(2)] == [[True] * 3, [True]]
    for i in range(13):
        np.testing.assert_array_equal(mix.loss_mask(2 + i), masks[i])
    assert [e["loss_mask"] for e in mix.metadata["inputs"]] == ["all-true", "file"]
    # Unmasked inputs only: the output has no mask either.
    proc = run_tool("merge_datasets.py", "--inputs", plain, plain, "--output", tmp_path / "pp", "--quiet")
    assert proc.returncode == 0 and not IndexedDataset(tmp_path / "pp").has_loss_mask
    assert not os.path.exists(tmp_path / "pp.mask")


def test_inspect_shows_which_tokens_are_targets(tmp_path):
    prefix = write_masked(tmp_path / "m", [[10, 11, 12, 13, 14, 15], [7]], [[0, 0, 1, 1, 0, 1], [1]])
    proc = run_tool("inspect_dataset.py", prefix, "--doc", 0, "--doc", 1, "--verify")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "loss mask:   m.mask, 4 target tokens (57.1% of tokens)" in out
    assert "max id:      15 (sidecar)" in out
    assert "targets: 3 of 6 tokens" in out and "target ids: 10 11 [[12 13]] 14 [[15]]" in out
    assert "target ids: [[7]]" in out
    assert "verified: the .bin's largest id matches the sidecar; the loss mask's sha256 matches the sidecar" in out
    raw = bytearray(open(f"{prefix}.mask", "rb").read())
    raw[24] ^= 1  # token 0 becomes a target: same size, so only --verify notices
    open(f"{prefix}.mask", "wb").write(bytes(raw))
    assert run_tool("inspect_dataset.py", prefix).returncode == 0
    proc = run_tool("inspect_dataset.py", prefix, "--verify")
    assert proc.returncode == 2 and "m.mask: sha256" in proc.stderr and "Traceback" not in proc.stderr
