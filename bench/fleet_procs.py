"""Memory of processes as /proc reports it: peak RSS and PSS of a process and its children.

PSS (proportional set size) splits each shared page among the processes that map it, so the PSS
of all a fleet's processes adds up to the memory the fleet really holds; RSS would count torch's
shared libraries once per process.
"""

from __future__ import annotations

from pathlib import Path


def tree(*roots: int) -> list[int]:
    """The roots and all their live descendants, each once."""
    seen: list[int] = []
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in seen or not Path(f"/proc/{p}").exists():
            continue
        seen.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return seen


def status_kb(pid: int | str, field: str, file: str = "status") -> int:
    """A `Field:  N kB` line of /proc/<pid>/status (or smaps_rollup), in kB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """The largest peak RSS (VmHWM) among a process and its children (a prefork pool), in MB."""
    return max((status_kb(p, "VmHWM") for p in tree(pid)), default=0) / 1024


def pss_mb(*roots: int) -> float:
    """Summed PSS of processes and all their children, in MB."""
    return sum(status_kb(p, "Pss", "smaps_rollup") for p in tree(*roots)) / 1024
