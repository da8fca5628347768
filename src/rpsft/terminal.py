"""What every command shows on the terminal: the user-error wrapper (a full disk included), the progress bar and
the number format.

Cheap to import (typer and rich only), so that command modules can use it without pulling in torch.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotImplementedError, PermissionError)

DISK_FULL_ERRNOS = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
# How a full disk reads where it arrives as text: safetensors re-raises Rust's io::Error formatted into its message
# ("IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })").
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")
# torch.save reports a failed write without its cause ("PytorchStreamWriter failed writing file ...: file write
# failed"); a filesystem with less than this left is taken to be the cause.
NEARLY_FULL_MIB = 64


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or while handling (not those it suppressed with ``from None``)."""
    out: list[BaseException] = []
    while e is not None and all(e is not x for x in out) and len(out) < 16:
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return out


def free_mib(path: str | Path) -> int | None:
    """Free space (MiB, as the current user may use it) on the filesystem that holds ``path`` or its nearest
    existing parent; None when even that cannot be asked."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free // 2**20
    except OSError:
        return None


def _nearly_full(where: str | Path | None) -> bool:
    free = free_mib(where) if where is not None else None
    return free is not None and free < NEARLY_FULL_MIB


def disk_full_message(e: BaseException, where: str | Path | None = None) -> str | None:
    """``"disk full while writing PATH (N MiB free on that filesystem)"`` when ``e``, or an exception it was raised
    from, says the disk or the user's quota is full (ENOSPC, EDQUOT); None for any other error. PATH is the file the
    error names, else ``where`` (else the working directory)."""
    path = None
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
            path = x.filename or where
            break
        text = str(x)
        if any(t in text for t in DISK_FULL_TEXT) or ("file write failed" in text and _nearly_full(where)):
            path = where
            break
    else:
        return None
    path = path if path is not None else os.getcwd()
    free = free_mib(path)
    return f"disk full while writing {path} ({'?' if free is None else free} MiB free on that filesystem)"


class DiskFullError(ValueError):
    """The disk (or quota) filled while a run was writing; the message names the file, the free space, the last
    sealed checkpoint and the command that continues the run."""


def disk_full_error(e: BaseException, out: str | Path, command: str) -> DiskFullError | None:
    """``e`` as a :class:`DiskFullError` for the run in ``out`` when it is a full disk (else None). Nothing is lost
    by it: a checkpoint is sealed only after every file of it was written, so the last sealed one is whole and
    ``COMMAND --config out/config.yaml --resume latest`` (the run's own resolved config) continues from it."""
    from .guards import latest_complete  # torch: only once a run has failed

    what = disk_full_message(e, out)
    if what is None:
        return None
    out = Path(out)
    last, config = latest_complete(out)[0], out / "config.yaml"
    if last is not None:
        return DiskFullError(f"{what}; nothing is lost: the last sealed checkpoint is {last} — free space and run "
                             f"`{command} --config {config} --resume latest`")
    if config.is_file():
        return DiskFullError(f"{what}; no checkpoint was sealed yet, so the run starts over — free space and run "
                             f"`{command} --config {config} --overwrite`")
    return DiskFullError(f"{what}; the run had not started — free space and run the command again")


def disk_full_is_a_user_error(command: str, output_dir):
    """Decorator of a run function (``train``, ``run_rl``): a full disk anywhere in it, a checkpoint save included,
    becomes a :class:`DiskFullError` (:func:`disk_full_error`) instead of a library traceback. ``output_dir`` maps
    the call's bound arguments to the run directory, as :func:`rpsft.runlock.locked` does. Cheap to apply: nothing
    heavy is imported until a run fails."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DiskFullError:
                raise  # already said, by a run this one drives
            except Exception as e:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                err = disk_full_error(e, output_dir(bound.arguments), command)
                if err is None:
                    raise
                raise err from e

        return run

    return wrap


def friendly_errors(fn=None, *, also: tuple[type[BaseException], ...] = ()):
    """Turn expected user errors (``USER_ERRORS`` and ``also``, and a full disk anywhere: :func:`disk_full_message`)
    into one red line on stderr and exit code 2; ``RPSFT_DEBUG=1`` re-raises them with their traceback instead. Use
    as ``@friendly_errors`` or ``@friendly_errors(also=(RuntimeError,))``."""
    if fn is None:
        return functools.partial(friendly_errors, also=also)
    caught = USER_ERRORS + tuple(also)

    def fail(msg: str):
        from rich.markup import escape

        console.print(f"[bold red]error:[/bold red] {escape(str(msg))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except caught as e:
            if os.environ.get("RPSFT_DEBUG"):
                raise
            fail(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        except Exception as e:  # a full disk is the user's to fix, whichever library's write ran into it
            full = disk_full_message(e)
            if full is None or os.environ.get("RPSFT_DEBUG"):
                raise
            fail(full)

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
