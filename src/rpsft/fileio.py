"""Atomic file writes: every result file is written to a temp file beside it and renamed into place, so an
interrupted run never leaves a half-written file that a resumed run would trust. JSON is written strictly: a
non-finite float (a diverged loss) becomes ``null``, never a bare ``NaN``/``Infinity``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; a result file gets the mode any other new file would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity, and a bare ``NaN`` in a
    metrics line breaks every strict reader (jq, JavaScript, pandas with ``orient="records"``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON (non-finite floats written as null, see :func:`finite_json`)."""
    return json.dumps(finite_json(obj), ensure_ascii=False, default=str, allow_nan=False, **kw)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line and flush it to disk (a crash loses at most the line being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (from a crash mid-append) is dropped, not fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: corrupt JSONL line") from None
    return rows
