"""One place for progress bars and console output, so every long step looks the same."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .processes import is_main_process


def _quiet() -> bool:
    # under a multi-process launcher only the main process draws bars and logs
    return os.environ.get("STILLHOUSE_QUIET", "") not in ("", "0") or not is_main_process()


class _Console(Console):
    """A stderr console that reads STILLHOUSE_QUIET when it prints, not when it is imported
    (a test or an embedding program may set it after stillhouse was first imported)."""

    @property
    def quiet(self) -> bool:
        return _quiet()

    @quiet.setter
    def quiet(self, value: bool) -> None:  # rich sets it in __init__; the environment decides
        pass


console = _Console(stderr=True)


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[callable]:
    """Yield an `advance(n=1, **fields)` callable backed by a rich progress bar."""
    if _quiet():
        yield lambda n=1, **_: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            kwargs = {"advance": n}
            if info is not None:
                kwargs["info"] = info
            bar.update(task, **kwargs)

        yield advance


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for steps with no natural count (loading a model)."""
    if _quiet():
        yield
        return
    with console.status(message):
        yield
    console.log(f"{message} done")
