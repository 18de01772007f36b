"""Rank 0's view of a tune from its first second: the stage it is in (setting up weights,
compiling, checking, timing a candidate), trials done and the best so far, and the ranks'
memory before the first trial.

On a terminal a rich progress bar carries the stage; elsewhere (CI logs, pipes) each stage
and each finished trial is one plain line with the seconds since the start, since a live
display there would print nothing until the end. Open MPI hands its ranks a pseudo-terminal
even when mpirun's own output goes to a file, so under an MPI launcher the bar is live only
when ``flashmoe-tune --gpus P`` saw a terminal itself (``LAUNCHER_TTY_ENV``).
``$FLASHMOE_PROGRESS=plain|live`` overrides either way.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from flashmoe_gen.memory import MemoryUse, gib

#: ``plain`` or ``live`` forces the style; unset or anything else: decided as above.
PROGRESS_ENV = "FLASHMOE_PROGRESS"
#: "1"/"0": whether the process that started mpirun (``flashmoe-tune --gpus P``) writes to
#: a terminal; its ranks inherit it.
LAUNCHER_TTY_ENV = "FLASHMOE_LAUNCHER_TTY"


def live_default(console: Console) -> bool:
    """Whether rank 0 shows a live bar (else plain lines)."""
    forced = os.environ.get(PROGRESS_ENV, "")
    if forced in ("plain", "live"):
        return forced == "live"
    from .launch import MPI_SIZE_VARS

    if any(v in os.environ for v in MPI_SIZE_VARS):
        return os.environ.get(LAUNCHER_TTY_ENV) == "1" and console.is_terminal
    return console.is_terminal


class TuneProgress:
    """Stages and trials of one study (one token count) on rank 0."""

    def __init__(self, total: int, label: str = "", console: Console | None = None,
                 live: bool | None = None):
        self.console = console or Console()
        self.live = live_default(self.console) if live is None else live
        self.total, self.label, self.done = total, label, 0
        self.t0 = time.monotonic()
        self._bar = self._task = None
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]" + label + "trial {task.completed}/{task.total}"),
                BarColumn(), TextColumn("best {task.fields[best]}"), TimeElapsedColumn(),
                TextColumn("{task.fields[stage]}"), console=self.console)
            self._task = self._bar.add_task("tune", total=total, best="-", stage="")
            self._bar.start()

    def _line(self, text: str) -> None:
        self.console.print(f"[{time.monotonic() - self.t0:7.1f} s] {self.label}{text}",
                           highlight=False, markup=False, soft_wrap=True)

    def stage(self, text: str, trial: bool = True) -> None:
        """The current stage; ``trial``: of the next trial (numbered), else of the setup."""
        if trial:
            text = f"trial {self.done + 1}/{self.total}: {text}"
        if self._bar is not None:
            self._bar.update(self._task, stage=text)
        else:
            self._line(text)

    def trial(self, res, best) -> None:
        """A finished trial (``study.TrialResult``) and the best so far."""
        self.done += 1
        best_text = f"{best.outcome.median_ms:.4f} ms" if best is not None else "-"
        if self._bar is not None:
            nxt = (f"trial {self.done + 1}/{self.total}: choosing the next candidate"
                   if self.done < self.total else "")
            self._bar.update(self._task, advance=1, best=best_text, stage=nxt)
            return
        o = res.outcome
        what = f"{o.median_ms:.4f} ms" if o.ok else f"{o.status}"
        self._line(f"trial {self.done}/{self.total} done: {what} (best {best_text}) "
                   f"{res.config.name}")

    def memory(self, uses: list[MemoryUse]) -> None:
        """The ranks' memory before the first trial, one row per rank."""
        self.console.print(memory_table(uses))

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def memory_table(uses: list[MemoryUse]) -> Table:
    t = Table(title="GPU memory per rank before the first trial (buffers: the default "
              "config's, at most)")
    for col in ("rank", "weights", "layer buffers", "free", "left after buffers", "GPU"):
        t.add_column(col, justify="right")
    for u in uses:
        left = gib(u.headroom) if u.headroom >= 0 else f"{gib(u.headroom)} (does not fit)"
        t.add_row(str(u.rank), gib(u.weights), gib(u.buffers), gib(u.free), left, gib(u.total))
    return t
