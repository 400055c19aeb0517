"""Progress bars with rate and ETA (rich), shared by every long-running stage."""

from __future__ import annotations

import os
import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f}/s", style="cyan")


def progress() -> Progress:
    """A progress display for `with progress() as bar: task = bar.add_task(...)`.

    Hidden when stderr is not a terminal (CI logs) or when `BUILDER_PROGRESS=0`.
    """
    disabled = os.environ.get("BUILDER_PROGRESS") == "0" or not sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=disabled,
    )
