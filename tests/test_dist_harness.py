"""The N-rank CPU harness itself (tests/dist.py): results by rank, failures named by rank, no hangs; and its
single process (start_process).

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
from dist import DistributedTestError, run_on_ranks, start_process

MARKER = "as imported"  # the parent changes it before launching; a fork of the parent would inherit the change


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


def group_is_up():
    return dist.is_initialized()


def print_both_and_exit(code):
    print("to stdout")
    print("to stderr", file=sys.stderr)
    return code + int(os.environ["HARNESS_ADD"])


def test_each_rank_runs_in_its_own_gloo_process_not_a_fork_of_the_parent(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARKER", "changed by the parent")
    reports = run_on_ranks(report, 3, 10.0)
    assert [r["rank"] for r in reports] == [0, 1, 2]
    assert all(r["world"] == 3 and r["backend"] == "gloo" for r in reports)
    assert [r["env"] for r in reports] == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3")]
    assert [r["sum"] for r in reports] == [60.0, 60.0, 60.0]  # (1 + 2 + 3) x 10: the collective really ran
    assert {r["marker"] for r in reports} == {"as imported"}  # not a fork of the parent
    assert {r["threads"] for r in reports} == {1}
    assert run_on_ranks(group_is_up, 2, init_group=False) == [False, False]  # left to the function


def test_start_process_runs_one_function_in_the_parents_environment_now(monkeypatch, tmp_path):
    run_on_ranks(group_is_up, 1)  # the ranks' server runs before the variable below is set
    monkeypatch.setenv("HARNESS_ADD", "2")
    proc = start_process(print_both_and_exit, 3, stdout=tmp_path / "out", stderr=tmp_path / "err")
    proc.join(timeout=60)
    assert proc.exitcode == 5  # the function's return value, with the variable the parent set after the server
    assert (tmp_path / "out").read_text() == "to stdout\n" and (tmp_path / "err").read_text() == "to stderr\n"


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
