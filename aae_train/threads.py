"""How many threads torch computes with, following the cores other processes leave idle.

On a machine shared with other work, torch's threads fight the other processes for the cores:
a thread that waits at a barrier for another one that the kernel has descheduled wastes its
time slice, and an epoch ran 10 x slower beside one busy process than alone. Fewer threads than
cores, when some cores are taken, avoid the fight; all the cores, when they are free, are
fastest. `ThreadPolicy` measures, about once a second, how much CPU time the *other* processes
used on the cores this process may run on (/proc/stat, less the time of this process and of its
children, the data loader's workers, from /proc/PID/stat) and sets torch's thread count to the
cores they left idle (at least 1).

Used when `aae-train` is not given --threads and trains in one process; elsewhere (another OS,
--threads N, several processes) the thread count stays as it is.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

INTERVAL_S = 1.0  # how often the other processes' use of the cores is measured
SLACK = 0.3  # cores the others may use before a thread gives way (their bursts, this process's own helpers)


def allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cores: list[int]) -> int | None:
    """Clock ticks the ``cores`` spent running anything (user, nice, system, irq, softirq, steal)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores}
    total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            total += user + nice + system + irq + softirq + steal
    return total


def _process_ticks(pid: int | str) -> int | None:
    """Clock ticks process ``pid`` (all its threads) ran, user and system."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def _own_ticks() -> dict[str, int] | None:
    """Clock ticks of this process and of each of its children (the data loader's decoding
    workers work for it), by pid."""
    own = _process_ticks("self")
    if own is None:
        return None
    children: set[str] = set()
    try:
        for task in Path("/proc/self/task").iterdir():
            children.update((task / "children").read_text().split())
    except OSError:
        pass
    ticks = {"self": own}
    for pid in children:
        t = _process_ticks(pid)
        if t is not None:
            ticks[pid] = t
    return ticks


def _own_delta(before: dict[str, int], now: dict[str, int]) -> int:
    """Ticks this process and its children ran between two samples (a child born in between: all
    of its ticks; one that ended in between: none, its last ticks are not known)."""
    return sum(t - before.get(pid, 0) for pid, t in now.items())


def threads_for(cores: int, others: float) -> int:
    """Threads for ``cores`` cores of which other processes used ``others`` cores' worth."""
    return max(1, min(cores, math.floor(cores - others + SLACK)))


class ThreadPolicy:
    """Call `tick` often (every training step); it re-measures every `INTERVAL_S` and sets
    torch's thread count, between 1 and ``most`` (torch's own choice with every core free).
    `changes` records (seconds since start, threads) for the user."""

    def __init__(self, set_threads, most: int, cores: list[int] | None = None, clock=time.monotonic):
        self.set_threads, self.clock, self.most = set_threads, clock, most  # most: threads with every core free
        self.cores = cores if cores is not None else allowed_cores()
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self.clock()
        self.threads = most
        self.changes: list[tuple[float, int]] = []
        self._last = self._sample()

    @property
    def works(self) -> bool:
        return self._last is not None

    def _sample(self):
        busy, own = _busy_ticks(self.cores), _own_ticks()
        return None if busy is None or own is None else (self.clock(), busy, own)

    def tick(self) -> int:
        """The thread count, changed when the other processes' use of the cores changed."""
        if self._last is None or self.clock() - self._last[0] < INTERVAL_S:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        seconds = now[0] - self._last[0]
        others = max(0.0, (now[1] - self._last[1]) - _own_delta(self._last[2], now[2])) / self.ticks_per_s / seconds
        self._last = now
        wanted = threads_for(self.most, others * self.most / len(self.cores))  # torch may run fewer threads than cores (SMT)
        if wanted != self.threads:
            self.threads = wanted
            self.set_threads(wanted)
            self.changes.append((round(now[0] - self.start, 1), wanted))
        return self.threads
