"""Helpers shared by the CLI command modules: one-line errors, progress bars."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``error: ...`` line on stderr and exit with ``code`` (no traceback)."""
    _stderr.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def particle_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr with particles per second; yields ``advance(k)``."""
    start = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=_stderr,
    )
    with bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(k: int) -> None:
            done = bar.tasks[task].completed + k
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=k, rate=f"{rate:,.0f} particles/s")

        yield advance
