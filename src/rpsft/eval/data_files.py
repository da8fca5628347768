"""``rpsft data eval-files``: checks evaluation files and installs them where ``rpsft eval`` looks.

Official files: ``--eval-dir``, else ``$RPSFT_EVAL_DIR``, else ``<cache>/eval`` (``<cache>`` = ``$RPSFT_CACHE``, else
``$XDG_CACHE_HOME/rpsft``, else ``~/.cache/rpsft``), laid out as ``id/*.jsonl`` and ``ood/*.jsonl``. GSM8K:
``$RPSFT_GSM8K_DIR``, else ``<cache>/eval/gsm8k``. Never relative to the current directory, so ``rpsft eval`` finds
the same files from wherever it is run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# where the files live (suites) and the rows' hash (loaders) sit below this module, which installs the files;
# the defaults stay importable from here
from rpsft.eval.loaders import row_to_item, rows_digest
from rpsft.eval.suites import (BENCHMARKS, cache_home, default_eval_home, eval_dir_default,  # noqa: F401
                               gsm8k_dir_default)


def find_official_root(src: Path) -> Path:
    """``src`` itself when it holds id/ or ood/, else the official repository's evaluation/data (or data/)."""
    for cand in (src, src / "evaluation" / "data", src / "data", src / "rpsft-eval"):
        if (cand / "id").is_dir() or (cand / "ood").is_dir():
            return cand
    raise FileNotFoundError(f"{src}: no id/ or ood/ folder of evaluation files here (nor under evaluation/data); "
                            f"pass --from a copy of the official evaluation data (id/*.jsonl, ood/*.jsonl)")


def _check_file(path: Path, judge: str) -> tuple[int, str]:
    """(rows, sha256) of an evaluation file whose every row becomes an item; ValueError naming the bad row."""
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            row_to_item(row, f"{path}:{n}", judge, n)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return len(rows), rows_digest(rows)


def install_eval_files(src: str | Path, dest: str | Path | None = None, gsm8k: str | Path | None = None) -> dict:
    """Check every ``id/*.jsonl`` / ``ood/*.jsonl`` under ``src`` (each row must become an evaluation item) and copy
    the good ones to ``dest`` (default: where ``rpsft eval`` looks). Returns ``{"installed", "invalid", "missing",
    "dest"}``; ``missing`` lists registry benchmarks without a file in ``src``."""
    root = find_official_root(Path(src).expanduser())
    explicit_dest = dest
    dest = Path(dest).expanduser() if dest else eval_dir_default()
    judges = {b.file: b.judge for b in BENCHMARKS.values() if b.source == "official"}
    installed: dict[str, dict] = {}
    invalid: dict[str, str] = {}
    for path in sorted([*root.glob("id/*.jsonl"), *root.glob("ood/*.jsonl")]):
        rel = path.relative_to(root).as_posix()
        judge = judges.get(rel, judges.get(rel.replace("_test.jsonl", ".jsonl"), "auto"))
        try:
            n, digest = _check_file(path, judge)
        except ValueError as e:
            invalid[rel] = str(e)
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        installed[rel] = {"rows": n, "sha256": digest}
    if gsm8k is not None:
        g = Path(gsm8k).expanduser()
        g = g / "test.jsonl" if g.is_dir() else g
        if not g.is_file():
            raise FileNotFoundError(f"--gsm8k {gsm8k}: no GSM8K test.jsonl there")
        n, digest = _check_file(g, "math")
        target = (gsm8k_dir_default() if explicit_dest is None else dest / "gsm8k") / "test.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(g, target)
        installed["gsm8k/test.jsonl"] = {"rows": n, "sha256": digest, "path": str(target)}
    if not installed and not invalid:
        raise FileNotFoundError(f"{root}: no .jsonl files under id/ or ood/")
    missing = sorted(name for name, b in BENCHMARKS.items() if b.source == "official" and b.file not in installed)
    if installed:
        manifest = dest / "manifest.json"
        old = json.loads(manifest.read_text()) if manifest.is_file() else {}
        manifest.write_text(json.dumps({**old, **installed}, indent=1, sort_keys=True) + "\n")
    return {"dest": str(dest), "root": str(root), "installed": installed, "invalid": invalid, "missing": missing}
