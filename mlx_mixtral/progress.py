"""Progress bars for long work (loading, converting), on stderr so stdout stays the answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: float, enabled: bool = True,
                 unit_column: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1)`; draws a transient rich bar on stderr when `enabled` and interactive."""
    if not enabled or not stderr_console.is_terminal:  # a log file or pipe gets no stray blank line
        yield lambda n=1: None
        return
    columns = [TextColumn("{task.description}"), BarColumn()]
    if unit_column:
        columns.append(MofNCompleteColumn())
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
