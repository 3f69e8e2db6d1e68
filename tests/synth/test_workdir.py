"""megasynth.synth.workdir's lock and manifest (issue 19): a second opener is refused naming the directory and the
holding tool (the trainer keeps its own wording), a directory with files but no manifest is never adopted, a
mismatch names the nested setting, settings added once the run started are checked on resume, and a lock whose
file the holder removed is never shared."""

from __future__ import annotations

import json
import os
import socket

import pytest

from megasynth.io import remove_dir
from megasynth.run_lock import LOCK_NAME, RunDirBusy, acquire_path_lock, acquire_run_lock
from megasynth.synth.workdir import MANIFEST, WorkDir, WorkDirMismatch

SETTINGS = {"input": {"path": "docs.jsonl", "max_tokens": 128}, "shard_size": 5}


def test_a_second_open_is_refused_naming_the_dir_and_the_tool(tmp_path):
    work = tmp_path / "x.work"
    with WorkDir.open(work, pipeline="synthesize", settings=SETTINGS):
        with pytest.raises(RunDirBusy) as e:
            WorkDir.open(work, pipeline="synthesize", settings=SETTINGS)
    msg = str(e.value)
    assert msg.startswith(f"{work}: in use by tools/synthesize.py (pid {os.getpid()} on host {socket.gethostname()}")
    assert msg.endswith("wait for it or use another --work-dir") and "\n" not in msg
    assert "train.run_dir" not in msg and "trainer" not in msg
    with acquire_run_lock(tmp_path / "run"):  # the trainer's wording is its own
        with pytest.raises(RunDirBusy, match=r"^train.run_dir .* is in use by another trainer \(pid "):
            acquire_run_lock(tmp_path / "run")


def test_files_without_a_manifest_are_refused_not_adopted(tmp_path):
    work = tmp_path / "emb.embed-work"
    work.mkdir()
    (work / "shard-000000.npy").write_bytes(b"from a run whose settings nobody recorded")
    with pytest.raises(WorkDirMismatch, match=rf"^{work}: holds shard-000000.npy but no {MANIFEST}"):
        WorkDir.open(work, pipeline="embed", settings=SETTINGS)
    assert not (work / MANIFEST).exists()
    (work / MANIFEST).write_text(json.dumps(SETTINGS))  # a flat manifest of the old embed format
    with pytest.raises(WorkDirMismatch, match="not a manifest of this version"):
        WorkDir.open(work, pipeline="embed", settings=SETTINGS)


def test_a_mismatch_names_the_nested_setting_and_late_settings_are_checked(tmp_path):
    work = tmp_path / "w"
    with WorkDir.open(work, pipeline="embed", settings=SETTINGS) as wd:
        assert wd.created
        wd.add_settings({"model": {"name": "m", "dim": 384}})
    other = {**SETTINGS, "input": {**SETTINGS["input"], "max_tokens": 16}}
    with pytest.raises(WorkDirMismatch, match=r"\(input.max_tokens: 128 then, 16 now\)"):
        WorkDir.open(work, pipeline="embed", settings=other)
    with pytest.raises(WorkDirMismatch, match=r"model.dim: 384 then, 768 now"):
        WorkDir.check(work, pipeline="embed", settings=SETTINGS, later={"model": {"name": "m", "dim": 768}})
    with WorkDir.open(work, pipeline="embed", settings=SETTINGS) as wd:  # the resume: same settings, same model
        assert not wd.created
        wd.add_settings({"model": {"name": "m", "dim": 384}})
        with pytest.raises(WorkDirMismatch, match=r"model.name: 'm' then, 'n' now"):
            wd.add_settings({"model": {"name": "n", "dim": 384}})
    WorkDir.check(work, pipeline="embed", settings=SETTINGS, later={"model": {"name": "m", "dim": 384}})


def test_a_lock_whose_file_the_holder_removed_is_not_shared(tmp_path, monkeypatch):
    import megasynth.run_lock as run_lock  # noqa: PLC0415

    work = tmp_path / "w"
    first = acquire_run_lock(work, tool="tools/embed_corpus.py")
    stale = os.open(work / LOCK_NAME, os.O_RDWR)  # a second run opens the file just before the holder's cleanup...
    remove_dir(work)  # ...the holder removes its finished work dir, still locked, and ends
    first.release()
    opens = []
    real_open = os.open
    monkeypatch.setattr(run_lock.os, "open",
                        lambda *a: opens.append(a) or (stale if len(opens) == 1 else real_open(*a)))
    second = acquire_run_lock(work, tool="tools/embed_corpus.py")  # locks the stale file, sees it, starts again
    monkeypatch.undo()
    assert len(opens) == 2 and (work / LOCK_NAME).is_file()
    with pytest.raises(RunDirBusy):  # the lock on the path as it is now is held: nobody else can take it
        acquire_run_lock(work, tool="tools/embed_corpus.py")
    second.release()

    prefix = tmp_path / "data" / "syn"
    lock = acquire_path_lock(prefix, tool="tools/synthesize.py", flag="--output-prefix")
    with pytest.raises(RunDirBusy, match=rf"^{prefix}: in use by tools/synthesize.py .*use another --output-prefix$"):
        acquire_path_lock(prefix, tool="tools/synthesize.py", flag="--output-prefix")
    lock.release(remove=True)
    assert list(prefix.parent.iterdir()) == []  # nothing left beside the output


def test_the_output_prefix_is_locked_with_the_work_dir(tmp_path):
    # EntiGraph and rephrase: two runs with different work dirs must not both publish to one output prefix.
    out = tmp_path / "data" / "entigraph"
    with WorkDir.open(tmp_path / "a", pipeline="entigraph", settings=SETTINGS, output=out):
        with pytest.raises(RunDirBusy, match=rf"^{out}: in use by tools/entigraph.py \(pid .*another --output-prefix$"):
            WorkDir.open(tmp_path / "b", pipeline="entigraph", settings=SETTINGS, output=out)
        assert not (tmp_path / "b" / MANIFEST).exists()  # refused before its manifest: nothing to adopt later
    assert list(out.parent.iterdir()) == []  # the lock file went with the run
