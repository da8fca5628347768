"""What every command shows on the terminal: the user-error wrapper, the progress bar and the number format.

Cheap to import (typer and rich only), so that command modules can use it without pulling in torch.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotImplementedError, PermissionError)


def friendly_errors(fn=None, *, also: tuple[type[BaseException], ...] = ()):
    """Turn expected user errors (``USER_ERRORS`` and ``also``) into one red line on stderr and exit code 2;
    ``RPSFT_DEBUG=1`` re-raises them with their traceback instead. Use as ``@friendly_errors`` or
    ``@friendly_errors(also=(RuntimeError,))``."""
    if fn is None:
        return functools.partial(friendly_errors, also=also)
    caught = USER_ERRORS + tuple(also)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except caught as e:
            if os.environ.get("RPSFT_DEBUG"):
                raise
            from rich.markup import escape

            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            console.print(f"[bold red]error:[/bold red] {escape(str(msg))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def progress_bar(label: str = "{task.description}", eta: bool = True, console: Console | None = None,
                 transient: bool = False):
    """The one progress bar: ``label`` (a rich format string), bar, done/total, elapsed, and (``eta``) the time
    remaining."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=transient)


def fmt(v: Any, spec: str | None = None, pct: bool = False, missing: str = "–") -> str:
    """One table cell: ``missing`` for None or NaN; a float as ``spec`` (default ``.4g``, or ``.1f`` of 100·v
    with ``pct``); an int as ``spec`` when one is given, else as written; anything else as ``str``."""
    if v is None or (isinstance(v, float) and v != v):
        return missing
    if isinstance(v, float):
        return format(100 * v if pct else v, spec or (".1f" if pct else ".4g"))
    if isinstance(v, int) and spec is not None:
        return format(v, spec)
    return str(v)
