"""Live progress of a running job: one rich progress bar per node plus the aggregator."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class NullProgress:
    shows_nodes = False  # whether update() draws anything: if not, nobody reads the node records for it

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def round_started(self, rnd: int, rounds: int, nodes: list[str], steps: int, distill_steps: int) -> None:
        pass

    def update(self, states: dict[str, dict]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class RichProgress(NullProgress):
    """Bars show local-training steps per node, loss, bytes sent and retries; then distillation."""

    shows_nodes = True

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stderr)
        self.bars = Progress(TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), console=self.console, transient=False)
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def round_started(self, rnd: int, rounds: int, nodes: list[str], steps: int, distill_steps: int) -> None:
        for task_id in self.tasks.values():
            self.bars.remove_task(task_id)
        self.tasks = {n: self.bars.add_task(f"r{rnd + 1}/{rounds} node {n}", total=steps, info="queued")
                      for n in nodes}
        self.tasks["aggregator"] = self.bars.add_task(f"r{rnd + 1}/{rounds} distill", total=distill_steps,
                                                      info="waiting for nodes")
        self.totals = {**{n: steps for n in nodes}, "aggregator": distill_steps}

    def update(self, states: dict[str, dict]) -> None:
        for name, s in states.items():
            if name not in self.tasks:
                continue
            info = [str(s.get("final") or s.get("status") or "queued")]
            if "loss" in s:
                info.append(f"loss {float(s['loss']):.3f}")
            if s.get("payload_bytes"):
                info.append(f"{int(s['payload_bytes']) / 1024:.0f} KiB sent")
            if int(s.get("retries", 0) or 0):
                info.append(f"retries {s['retries']}")
            done = s.get("status") in ("arrived", "late", "failed") or s.get("final")
            step = self.totals[name] if done else int(s.get("step", 0) or 0)
            self.bars.update(self.tasks[name], completed=step, info=", ".join(info))

    def message(self, text: str) -> None:
        self.console.print(text)
