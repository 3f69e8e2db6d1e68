"""Publishing a prefix: a writer SIGKILLed after each step of the protocol leaves the complete old prefix, no
prefix, or the complete new one; files of two different writes are refused; preprocess_data and merge_datasets
refuse an existing output without --overwrite and an empty one without --allow-empty (real CLI runs)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megasynth.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    prefix_exists,
)
from megasynth.data.prefix import FAULT_ENV, PUBLISH_STEPS
from megasynth.io import is_temp_name, remove_stale_temps
from megasynth.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]

_WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from megasynth.data.indexed import IndexedDatasetWriter
    prefix, spec = sys.argv[1], json.loads(sys.argv[2])
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"name": spec["name"]}, loss_mask=spec["masked"]) as w:
        for d, m in zip(spec["docs"], spec["masks"]):
            w.add_document(d, loss_mask=np.array(m, dtype=bool) if spec["masked"] else None)
""")


def version(name, masked, seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 5000, size=int(n)).tolist() for n in rng.integers(1, 20, size=int(rng.integers(3, 9)))]
    masks = [(rng.random(len(d)) < 0.5).tolist() for d in docs]
    return {"name": name, "masked": masked, "docs": docs, "masks": masks}


def write(prefix, spec):
    with IndexedDatasetWriter(prefix, np.uint16, metadata={"name": spec["name"]}, loss_mask=spec["masked"]) as w:
        for d, m in zip(spec["docs"], spec["masks"]):
            w.add_document(d, loss_mask=np.array(m, dtype=bool) if spec["masked"] else None)


def run_killed_writer(prefix, spec, kill_after):
    """The same write in a subprocess that SIGKILLs itself right after the publish step `kill_after`."""
    env = {**os.environ, FAULT_ENV: kill_after}
    return subprocess.run([sys.executable, "-c", _WRITER, str(prefix), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=60)


def state_of(prefix, old, new):
    """"old", "new" or "absent" (refused with an IndexedDatasetError); fails on anything else."""
    try:
        ds = IndexedDataset(prefix)
    except IndexedDatasetError:
        return "absent"
    for name, spec in (("old", old), ("new", new)):
        if spec is not None and ds.metadata is not None and ds.metadata.get("name") == spec["name"]:
            assert [ds[i].tolist() for i in range(len(ds))] == spec["docs"]
            assert ds.has_loss_mask == spec["masked"]
            if spec["masked"]:
                assert [ds.loss_mask(i).tolist() for i in range(len(ds))] == spec["masks"]
            ds.verify()
            return name
    raise AssertionError(f"{prefix} opens as neither the old nor the new prefix: {ds!r}, {ds.metadata}")


SCENARIOS = {  # (old prefix, new prefix): masked or not, None = no old prefix
    "masked->unmasked": (True, False),
    "unmasked->masked": (False, True),
    "none->masked": (None, True),
}
CASES = [(s, step) for s, (_, new_masked) in SCENARIOS.items() for step in PUBLISH_STEPS
         if new_masked or step != "mask-renamed"]


@pytest.mark.parametrize("scenario, step", CASES, ids=[f"{s}@{step}" for s, step in CASES])
def test_sigkill_at_each_publish_step(tmp_path, scenario, step):
    old_masked, new_masked = SCENARIOS[scenario]
    prefix = tmp_path / "x"
    old = None
    if old_masked is not None:
        old = version("old", old_masked, seed=1)
        write(prefix, old)
        assert state_of(prefix, old, None) == "old"
    new = version("new", new_masked, seed=2)
    proc = run_killed_writer(prefix, new, step)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = state_of(prefix, old, new)
    if step == "temps-written":
        assert state == ("old" if old else "absent")  # nothing under a final name was touched yet
    elif step == "idx-renamed":
        assert state == "new"  # the commit point was passed
    else:
        assert state == "absent" and not (tmp_path / "x.idx").exists()
    # What the crash leaves besides the prefix files are temp names, which remove_stale_temps clears; a rerun
    # of the write then publishes the new prefix as usual.
    leftovers = [p for p in os.listdir(tmp_path) if not p.startswith("x.")]
    assert all(is_temp_name(p) for p in leftovers), leftovers
    remove_stale_temps(tmp_path)
    write(prefix, new)
    assert state_of(prefix, old, new) == "new"
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx", "x.json"] + (["x.mask"] if new_masked else [])


def _same_shape_pair(tmp_path):
    """Two prefixes with equal document and token counts and dtype but different tokens."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    with IndexedDatasetWriter(a, np.uint16) as w:
        w.add_documents([[1, 2, 3], [4]])
    with IndexedDatasetWriter(b, np.uint16) as w:
        w.add_documents([[9], [8, 7, 6]])
    return a, b


def test_files_of_different_writes_are_refused(tmp_path):
    a, b = _same_shape_pair(tmp_path)
    # A new .bin/.idx (e.g. from Megatron's tools) beside the old sidecar: the counts agree, the .idx sha does not.
    for ext in (".bin", ".idx"):
        shutil.copy(f"{b}{ext}", f"{a}{ext}")
    with pytest.raises(IndexedDatasetError, match=r"a\.json: records a\.idx with sha256 .*the sidecar and the index "
                                                  r"come from different writes \(a stale a\.json"):
        IndexedDataset(a)
    # The old .bin/.idx beside a new sidecar: refused the same way.
    a2, b2 = _same_shape_pair(tmp_path / "2")
    shutil.copy(f"{b2}.json", f"{a2}.json")
    with pytest.raises(IndexedDatasetError, match="come from different writes"):
        IndexedDataset(a2)
    meta = json.loads(open(f"{b2}.json").read())
    open(f"{b2}.json", "w").write(json.dumps({**meta, "files": {**meta["files"], "bin": {"size": 6}}}))
    with pytest.raises(IndexedDatasetError, match=r"b\.json: records b\.bin of 6 bytes, the file has 8"):
        IndexedDataset(b2)
    # Deleting the sidecar is the documented way to open the .bin/.idx alone.
    os.remove(f"{a}.json")
    assert IndexedDataset(a)[1].tolist() == [8, 7, 6]


# -- the command-line tools --------------------------------------------------------------------------------------
def run_tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 3} times." for i in range(30)]
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300)


def test_preprocess_refuses_an_existing_output_without_overwrite(tmp_path, tokenizer):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"text": f"first {i}"}) + "\n" for i in range(3)))
    second.write_text("".join(json.dumps({"text": f"second {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "data" / "x"
    args = ["--tokenizer", tokenizer.path, "--output-prefix", out, "--no-progress", "--workers", 0]
    assert run_tool("preprocess_data.py", "--input", first, *args).returncode == 0
    before = {ext: Path(f"{out}{ext}").read_bytes() for ext in (".bin", ".idx", ".json")}
    proc = run_tool("preprocess_data.py", "--input", second, *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{out}: the output prefix exists (x.bin, x.idx, x.json); pass --overwrite "
                                        "to replace it"]
    assert {ext: Path(f"{out}{ext}").read_bytes() for ext in before} == before
    proc = run_tool("preprocess_data.py", "--input", second, *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(IndexedDataset(out)) == 5
    assert sorted(os.listdir(out.parent)) == ["x.bin", "x.idx", "x.json"]
    help_text = run_tool("preprocess_data.py", "--help").stdout
    assert "--overwrite" in help_text and "--allow-empty" in help_text


def test_preprocess_refuses_an_empty_output_without_allow_empty(tmp_path, tokenizer):
    src = tmp_path / "empty.jsonl"
    src.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  \n"}) + "\n")
    out = tmp_path / "out" / "x"
    args = ["--input", src, "--tokenizer", tokenizer.path, "--output-prefix", out, "--no-progress"]
    proc = run_tool("preprocess_data.py", *args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{out}: the output would hold no documents; pass --allow-empty to write an "
                                        "empty prefix"]
    assert not out.parent.exists()  # the directory the run created is gone again, and no temp files
    proc = run_tool("preprocess_data.py", *args, "--allow-empty")
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(out)
    assert len(ds) == 0 and ds.max_token_id == -1


def test_merge_refuses_an_existing_or_empty_output(tmp_path):
    a = tmp_path / "a"
    with IndexedDatasetWriter(a, np.uint16) as w:
        w.add_documents([[1, 2], [3]])
    empty = tmp_path / "empty"
    with IndexedDatasetWriter(empty, np.uint16):
        pass
    out = tmp_path / "out"
    assert run_tool("merge_datasets.py", "--inputs", a, "--output", out, "--quiet").returncode == 0
    proc = run_tool("merge_datasets.py", "--inputs", a, a, "--output", out, "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{out}: the output prefix exists (out.bin, out.idx, out.json); pass "
                                        "--overwrite to replace it"]
    assert len(IndexedDataset(out)) == 2
    proc = run_tool("merge_datasets.py", "--inputs", a, a, "--output", out, "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(IndexedDataset(out)) == 4
    proc = run_tool("merge_datasets.py", "--inputs", empty, "--output", tmp_path / "e", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"{tmp_path / 'e'}: the output would hold no documents; pass --allow-empty "
                                        "to write an empty prefix"]
    assert not prefix_exists(tmp_path / "e")
    assert run_tool("merge_datasets.py", "--inputs", empty, "--output", tmp_path / "e", "--quiet",
                    "--allow-empty").returncode == 0
    assert len(IndexedDataset(tmp_path / "e")) == 0
