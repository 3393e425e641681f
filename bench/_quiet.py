"""Noticing other work on the machine while a measurement runs, and running it again when there was some.

llama.cpp's threads wait for each other at every step, so on a small machine one busy neighbour process can
make a decode loop ten times slower. Each measurement is therefore timed together with the CPU time that
processes other than the bench and its servers used meanwhile (from /proc); a disturbed one is repeated, and
the quietest attempt is kept. When the machine stays busy (two measurements in a row found no quiet attempt)
repeating is pointless and stops until a quiet run is seen again. Where /proc is missing nothing is checked.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (steal included: the hypervisor's other guests count too)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


def process_seconds(pid: int) -> float:
    """CPU seconds one process (all its threads) has used; 0 once it is gone."""
    return stat_seconds(f"/proc/{pid}/stat")


def stat_seconds(path: str) -> float:
    """CPU seconds (user + system) from a process's or a thread's ``stat`` file; 0 once it is gone."""
    try:
        with open(path, encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


class Quiet:
    """Runs measurements, repeating those during which other processes kept more than ``limit`` CPUs busy."""

    def __init__(self, pids: list[int], limit: float = 0.15, attempts: int = 3, pause: float = 2.0):
        self.pids, self.limit, self.attempts, self.pause = pids, limit, attempts, pause
        self.enabled = os.path.exists("/proc/stat")
        self.repeated = 0
        self.busy_streak = 0  # measurements in a row without a quiet attempt
        self.worst_kept = 0.0  # the most foreign CPU load among the attempts kept

    def _snapshot(self) -> tuple[float, float, float]:
        own = sum(process_seconds(pid) for pid in self.pids)
        return time.perf_counter(), busy_seconds(), own

    def foreign_load(self, before: tuple[float, float, float]) -> float:
        """CPUs kept busy by other processes since ``before`` (0.5 = half a CPU on average)."""
        wall, busy, own = (after - start for after, start in zip(self._snapshot(), before, strict=True))
        return max(0.0, (busy - own) / wall) if wall > 0 else 0.0

    def run(self, measure: Callable[[], T]) -> T:
        """The result of the quietest of up to ``attempts`` runs of ``measure`` (the first quiet one ends it)."""
        if not self.enabled:
            return measure()
        best: tuple[float, T] | None = None
        attempts = 1 if self.busy_streak >= 2 else self.attempts
        for attempt in range(attempts):
            if attempt:
                self.repeated += 1
                time.sleep(self.pause)  # neighbours' work often comes in bursts: let one pass
            before = self._snapshot()
            result = measure()
            load = self.foreign_load(before)
            if best is None or load < best[0]:
                best = (load, result)
            if load <= self.limit:
                break
            if attempt + 1 < attempts:
                print(f"bench: other processes used {load:.2f} CPUs meanwhile; measuring again", file=sys.stderr)
        self.busy_streak = 0 if best[0] <= self.limit else self.busy_streak + 1
        self.worst_kept = max(self.worst_kept, best[0])
        return best[1]
