"""megasynth.procs.die_with_parent: a child dies with its SIGKILLed parent, by the kernel's parent-death signal
and by the watchdog used where that signal does not exist; a parent already gone is noticed at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procfs import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
from megasynth.procs import die_with_parent
print("mechanism", die_with_parent(int(sys.argv[1]), sys.argv[2]), flush=True)
time.sleep(600)
"""
PARENT = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
time.sleep(600)
"""
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the children through /proc")


@pytest.mark.parametrize("mechanism", ["pdeathsig", "watchdog"])
def test_child_dies_with_its_sigkilled_parent(mechanism):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mechanism], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, start_new_session=True)
    try:
        assert parent.stdout.readline().split() == ["mechanism", mechanism]  # the child is set up
        children = descendants(parent.pid)
        assert len(children) == 1
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20  # a bounded poll, not a speed check
        while any(alive(pid, start) for pid, start in children.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid, start) for pid, start in children.items()), "the child outlived its parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # this test's own session only
        except ProcessLookupError:
            pass
        parent.wait()


@pytest.mark.parametrize("mechanism", ["auto", "watchdog"])
def test_a_parent_already_gone_is_noticed_at_once(mechanism):
    # The parent pid passed in is that of a process that has exited: as if the parent died before the child got
    # to die_with_parent (the child's real parent is this test, so its ppid differs from the pid it is given).
    gone = subprocess.Popen(["true"])
    gone.wait()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(gone.pid), mechanism], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "mechanism" not in proc.stdout, proc.stderr


def test_unknown_mechanism_is_an_error():
    from megasynth.procs import die_with_parent

    with pytest.raises(ValueError, match="mechanism must be one of"):
        die_with_parent(os.getppid(), "polling")
