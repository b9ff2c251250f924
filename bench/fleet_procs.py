"""Memory of processes as /proc reports it: peak RSS and PSS of a process and its children.

PSS (proportional set size) splits each shared page among the processes that map it, so the PSS
of all a fleet's processes adds up to the memory the fleet really holds; RSS would count torch's
shared libraries once per process.
"""

from __future__ import annotations

from pathlib import Path


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """The largest peak RSS (VmHWM) among a process and its children (a prefork pool), in MB."""
    return max((_status_kb(p, "VmHWM") for p in tree(pid)), default=0) / 1024


def pss_mb(pid: int) -> float:
    """Summed PSS of a process and its children, in MB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024
