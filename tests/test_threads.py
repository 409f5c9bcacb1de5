"""aae_train.threads: torch's thread count follows the cores other processes leave idle, measured
from /proc with a real busy process beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from aae_train.threads import ThreadPolicy, allowed_cores, threads_for

BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def _stranger(core: int) -> int:
    """A busy process on ``core`` that is not this process's child (its parent shell exits): its pid."""
    r = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" {core} >/dev/null 2>&1 & echo $!', BUSY],
                       capture_output=True, text=True, check=True)
    return int(r.stdout)


def test_threads_are_the_cores_left_idle_at_least_one():
    assert threads_for(2, 0.0) == 2 and threads_for(2, 0.2) == 2  # a little noise leaves every core
    assert threads_for(2, 0.6) == 1 and threads_for(2, 1.0) == 1 and threads_for(2, 5.0) == 1
    assert threads_for(8, 2.0) == 6 and threads_for(8, 0.0) == 8


def _watch(policy: ThreadPolicy, seconds: float) -> list[int]:
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(policy.tick())
        time.sleep(0.05)
    return seen


def test_a_busy_process_on_the_cores_takes_a_thread_away_and_gives_it_back_when_it_ends():
    cores = allowed_cores()[:2]
    set_to = []
    policy = ThreadPolicy(set_to.append, most=len(cores), cores=cores)
    assert policy.works
    busy = _stranger(cores[0])
    try:
        during = _watch(policy, 3.5)
    finally:
        os.kill(busy, signal.SIGKILL)
    after = _watch(policy, 3.5)
    assert during[-1] == max(1, len(cores) - 1), during  # one core's worth taken
    assert after[-1] == len(cores), after
    assert set_to[-1] == len(cores) and (len(cores) == 1 or max(1, len(cores) - 1) in set_to)
    assert all(t > 0 for t, _ in policy.changes)


def test_the_policy_counts_its_own_children_as_its_own_work():
    cores = allowed_cores()[:2]
    policy = ThreadPolicy(lambda n: None, most=len(cores), cores=cores)
    child = subprocess.Popen([sys.executable, "-c", BUSY, str(cores[0])])
    try:  # a child of this process: its time is this process's own (a data loader's worker)
        seen = _watch(policy, 3.5)
    finally:
        child.kill()
        child.wait()
    assert seen[-1] == len(cores), seen
