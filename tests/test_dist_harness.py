"""The N-rank CPU harness itself (tests/dist.py): results by rank, failures named by rank, no hangs.

    pytest tests/test_dist_harness.py -x -q
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
import torch
import torch.distributed as dist
from dist import DistributedTestError, run_on_ranks

MARKER = "as imported"  # the parent changes it before launching; a forked child would inherit the change


def report(scale):
    """Who am I, as torch.distributed and the environment see it, and a collective's result."""
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
            "sum": value.item() * scale, "marker": MARKER, "threads": torch.get_num_threads()}


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("bad shard on purpose")
    dist.barrier()  # rank 0 would wait here forever for rank 1: the harness must not
    return "unreachable"


def hang_on_rank_one():
    if dist.get_rank() == 1:
        time.sleep(120)
    return dist.get_rank()


def die_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()
    return "unreachable"


def test_each_rank_runs_in_its_own_spawned_gloo_process(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARKER", "changed by the parent")
    reports = run_on_ranks(report, 3, 10.0)
    assert [r["rank"] for r in reports] == [0, 1, 2]
    assert all(r["world"] == 3 and r["backend"] == "gloo" for r in reports)
    assert [r["env"] for r in reports] == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3")]
    assert [r["sum"] for r in reports] == [60.0, 60.0, 60.0]  # (1 + 2 + 3) x 10: the collective really ran
    assert {r["marker"] for r in reports} == {"as imported"}  # spawn, not fork
    assert {r["threads"] for r in reports} == {1}


def test_an_exception_on_one_rank_fails_with_its_traceback_and_does_not_hang():
    started = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_on_ranks(fail_on_rank_one, 2, timeout=60)
    message = str(err.value)
    assert message.startswith("rank 1 of 2 raised")
    assert "ValueError: bad shard on purpose" in message and "fail_on_rank_one" in message  # the traceback
    # Rank 0, stuck in a barrier, was stopped instead of waiting out the timeout or the gloo timeout.
    assert time.monotonic() - started < 45


def test_a_rank_that_dies_silently_is_named_with_its_exit_code():
    with pytest.raises(DistributedTestError, match=r"^rank 1 of 2 died with exit code 7 without reporting"):
        run_on_ranks(die_on_rank_one, 2, timeout=60)


def test_a_hung_rank_is_reported_after_the_timeout():
    started = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_on_ranks(hang_on_rank_one, 2, timeout=6)
    # Rank 0 normally finishes first; on a very busy machine it may still be starting, so it may be listed too.
    assert re.search(r"timed out after 6s; ranks \[(0, )?1\] had not finished", str(err.value)), str(err.value)
    assert time.monotonic() - started < 25
