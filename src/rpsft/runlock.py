"""One process per run directory: an exclusive lock held for the life of a run.

Every command that writes a run (``rpsft train``, ``rl``, ``eval``, ``compare``, ``analyze``) holds an exclusive
``flock`` on ``<dir>/.rpsft.lock`` from before it reads or deletes anything in the directory (``--resume``,
``--overwrite``, eval's resumable ``samples.jsonl``) until it returns. A second process that asks for the same
directory gets :class:`RunDirInUse` at once (never a wait), one line naming the holder's pid and command, which the
CLI's user-error wrapper prints as ``error: ...`` with exit status 2.

* The lock belongs to the open file, so the operating system drops it when the holder dies, SIGKILL included; a
  lock file left behind by a killed run is taken over by the next run.
* Re-entrant within a process: a library call that locks a directory this process already holds (``rpsft compare``
  driving ``train()`` and the evaluation runner, ``rpsft rl`` evaluating into its own directory) shares the held
  lock. This needs the process-local registry below: ``flock`` on a second descriptor of the same file conflicts
  with the first even in the same process.
* Under a multi-process launch (``accelerate launch``, torchrun) only rank 0 takes the lock; the other ranks follow
  rank 0 and do not lock. A refused launch's rank 0 exits with status 2 and the launcher stops its other ranks.
* The lock file is removed on release, and a directory this lock created is removed again when the run left it
  empty (a run refused by a preflight check leaves nothing behind). ``--overwrite`` never deletes the lock file
  (:func:`rpsft.guards.clear_run_dir`).
* Windows has no ``fcntl``: runs are not locked there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; rpsft runs there without the run-directory lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".rpsft.lock"

log = logging.getLogger("rpsft")


class RunDirInUse(FileExistsError):
    """Another process holds the run directory; the message names its pid and command, and the fix."""


# realpath of a directory -> [lock-file descriptor (None: the filesystem refused flock), depth, command]
_held: dict[str, list] = {}
_mutex = threading.Lock()


def lock_rank() -> int:
    """This process's rank in a multi-process launch (0 when alone): the process group's rank once it exists, else
    the launcher's ``RANK`` (``LOCAL_RANK`` where only that is set), read before any process group is made."""
    import sys

    dist = sys.modules.get("torch.distributed")  # imported by whoever uses it; never imported here
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return 0


def _missing_parents(d: Path) -> list[Path]:
    """``d`` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(fd: int) -> dict:
    """The holder's record from the lock file. Empty while the holder is between taking the lock and writing its
    record, or when the record is a dead process's (the new holder has not overwritten it yet): read again."""
    import time

    for _ in range(50):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError, UnicodeDecodeError):
            info = {}
        pid = info.get("pid") if isinstance(info, dict) else None
        if isinstance(pid, int) and (info.get("host") != socket.gethostname() or _pid_alive(pid)):
            return info
        time.sleep(0.01)
    return {}


def _busy(d: Path, info: dict, what: str) -> RunDirInUse:
    who = ""
    if info:
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = f" (pid {info['pid']}{where}, {info.get('command') or 'rpsft'})"
    return RunDirInUse(f"{d} is in use by another rpsft process{who}; wait for it to finish or choose another "
                       f"{what}")


def _acquire(d: Path, command: str, what: str) -> int | None:
    """Open ``d/.rpsft.lock``, take the exclusive lock without waiting and write this process's record into it.

    The file is unlinked on release, so a process may open the old file, then lock it after its holder let it go:
    the lock is kept only when the path still names the locked file (else this opens the current one again)."""
    path = d / LOCK_NAME
    for _ in range(100):
        try:
            d.mkdir(parents=True, exist_ok=True)  # again: an emptied directory may have been removed meanwhile
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise PermissionError(f"{d} cannot hold the run's lock file {LOCK_NAME} ({e.strerror}); choose a "
                                  f"writable {what}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            raise _busy(d, info, what) from None
        except OSError as e:  # a filesystem without flock support (some network and FUSE mounts)
            os.close(fd)
            log.warning("%s cannot be locked (%s); running without the run-directory lock: make sure no other "
                        "rpsft process writes into it", d, e.strerror)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}) + "\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
            return fd
        os.close(fd)  # its holder released and removed it between our open and our lock: open the current one
    raise _busy(d, {}, what)


def _release(d: Path, fd: int | None) -> None:
    if fd is None:
        return
    path = d / LOCK_NAME
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            path.unlink()  # still holding it: a waiting process that opened this file sees it gone and retries
    except OSError:
        pass
    os.close(fd)  # drops the lock


@contextlib.contextmanager
def hold(directory: str | Path, command: str, what: str = "output_dir") -> Iterator[None]:
    """Hold ``directory``'s run lock for the ``with`` block (creating the directory); :class:`RunDirInUse` when
    another process holds it. ``command`` is recorded for that process's message (``rpsft train``); ``what`` names
    the setting to change in it (``output_dir``, ``--out``). Re-entrant within a process; a no-op on ranks other
    than 0 and where ``fcntl`` is missing (see the module doc)."""
    if fcntl is None or lock_rank() != 0:
        yield
        return
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} is a file, not a directory; choose another {what}")
    created = _missing_parents(d.absolute())
    key = os.path.realpath(d)
    with _mutex:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            # nested in another locked run of this process (compare -> train): record the outer command, the one
            # a user sees in `ps` and waits for
            outer = next(iter(_held.values()))[2] if _held else command
            try:
                fd = _acquire(d, outer, what)
            except BaseException:
                _remove_empty(created)
                raise
            entry = _held[key] = [fd, 1, outer]
    try:
        yield
    finally:
        with _mutex:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(d, entry[0])
                _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this lock created, deepest first, as long as they are empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return


def locked(command: str, directory: Callable[[dict[str, Any]], str | Path], what: str = "output_dir"):
    """Decorator: run the function under :func:`hold` on ``directory(arguments)``, the directory computed from the
    call's bound arguments (defaults applied), e.g. ``lambda a: a["cfg"].output_dir``."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with hold(directory(bound.arguments), command, what):
                return fn(*args, **kwargs)

        return wrapper

    return wrap
