"""work_units against a real work directory and a real lock file: which turn a worker that found every unit
done gets (the one publish step of preprocess, embed, synthesize and the LLM tools), and how a work directory of
other settings is refused."""

from __future__ import annotations

import pytest

from megasynth.run_lock import RunDirBusy, acquire_path_lock
from megasynth.work_units import WorkUnits, WorkUnitsError, publishing


def _turn(units: WorkUnits, out, publish: str = "auto") -> str:
    with publishing(units, out, f"{out}.idx", tool="a test publisher", flag="--output-prefix",
                    publish=publish) as turn:
        if turn == "publish":  # what a stage does with its turn: write the output, then say it is published
            (out.parent / "data.idx").write_bytes(b"index")
            units.mark_published(out, {"documents": 3})
        return turn


def test_one_publisher_then_done_until_the_output_is_gone(tmp_path):
    units = WorkUnits(tmp_path / "work", stage="test", settings={"a": 1}, num_units=2)
    out = tmp_path / "data"
    assert units.published(f"{out}.idx") is None
    assert _turn(units, out) == "publish"
    assert not (tmp_path / "data.lock").exists()  # the publisher's lock file is removed with the lock
    assert units.published(f"{out}.idx")["summary"] == {"documents": 3}
    assert _turn(units, out) == "done"  # published while this worker looked: nothing to do
    assert _turn(units, out, publish="only") == "publish"  # an explicit publish step publishes again
    (tmp_path / "data.idx").unlink()  # the output was deleted after publishing: the record alone does not count
    assert units.published(f"{out}.idx") is None
    assert units.published()["summary"] == {"documents": 3}
    assert _turn(units, out) == "publish"


def test_a_held_lock_leaves_publishing_to_its_holder_unless_publish_only(tmp_path):
    units = WorkUnits(tmp_path / "work", stage="test", settings={}, num_units=1)
    out = tmp_path / "data"
    held = acquire_path_lock(out, tool="tools/other.py", flag="--output-prefix")
    try:
        assert _turn(units, out) == "busy"
        with pytest.raises(RunDirBusy, match="in use by tools/other.py"):
            _turn(units, out, publish="only")
        assert not (tmp_path / "data.idx").exists()  # neither wrote anything
    finally:
        held.release(remove=True)
    assert _turn(units, out, publish="only") == "publish"


def test_a_work_dir_of_other_settings_is_refused_naming_what_changed(tmp_path):
    WorkUnits(tmp_path / "work", stage="test", settings={"input": {"max_tokens": 128}, "seed": 1}, num_units=3)
    with pytest.raises(WorkUnitsError, match=r"other settings \(input.max_tokens: 128 then, 16 now\)"):
        WorkUnits(tmp_path / "work", stage="test", settings={"input": {"max_tokens": 16}, "seed": 1}, num_units=3)
    with pytest.raises(WorkUnitsError, match=r"other settings \(number of units: 3 then, 4 now\)"):
        WorkUnits(tmp_path / "work", stage="test", settings={"input": {"max_tokens": 128}, "seed": 1}, num_units=4)
    with pytest.raises(WorkUnitsError, match=r"belongs to 'test', not the 'other' stage"):
        WorkUnits(tmp_path / "work", stage="other", settings={}, num_units=3)
    # The original settings open it again.
    WorkUnits(tmp_path / "work", stage="test", settings={"seed": 1, "input": {"max_tokens": 128}}, num_units=3)
