"""Per-process memory from ``/proc/PID/smaps_rollup``: PSS and RSS.

RSS counts every resident page a process maps, so N processes sharing one page count it
N times. PSS (proportional set size) charges a page shared by N processes 1/N to each,
so the PSS of a group of processes, summed, is the memory the group really uses: the
right measure for "one copy for all plugins". A page counts only while it is mapped:
measure with every process alive at once, after each has touched what it uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MemoryUsage", "memory_usage", "MIB"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryUsage:
    """Memory of one process, in bytes (``smaps_rollup``; kB in the file)."""

    pid: int
    rss_bytes: int
    pss_bytes: int
    pss_anon_bytes: int
    """PSS of private anonymous memory: heaps and, in the copying design, each plugin's copy."""
    pss_file_bytes: int
    """PSS of file pages: libraries and ``.cwasm`` artifacts (the embedded design's data)."""
    pss_shmem_bytes: int
    """PSS of shared memory: memfd and shm regions (the loan design's blob)."""

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / MIB

    @property
    def pss_mib(self) -> float:
        return self.pss_bytes / MIB

    @staticmethod
    def total(usages: Iterable[MemoryUsage]) -> MemoryUsage:
        """The sum over processes (``pid`` 0)."""
        items = list(usages)
        return MemoryUsage(
            0,
            sum(u.rss_bytes for u in items),
            sum(u.pss_bytes for u in items),
            sum(u.pss_anon_bytes for u in items),
            sum(u.pss_file_bytes for u in items),
            sum(u.pss_shmem_bytes for u in items),
        )


def memory_usage(pid: int | None = None) -> MemoryUsage:
    """PSS and RSS of process ``pid`` (default: this one). Raises OSError if it is gone or unreadable."""
    pid = os.getpid() if pid is None else pid
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return MemoryUsage(
        pid,
        fields.get("Rss", 0),
        fields.get("Pss", 0),
        fields.get("Pss_Anon", 0),
        fields.get("Pss_File", 0),
        fields.get("Pss_Shmem", 0),
    )
