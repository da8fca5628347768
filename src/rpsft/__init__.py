"""rpsft — Rotation-Preserving Supervised Fine-Tuning.

Public API (imported lazily so that ``rpsft --help`` does not pay for torch):
``RotationAnchor``, ``select_matrices``, ``resolve_ranks``, ``load_model``, ``load_config``,
``AnchoredSFTTrainer``, ``AnchorMixin``, ``compute_bases``.
"""

from __future__ import annotations

import importlib

try:  # the installed distribution's version (pyproject.toml), so the two cannot disagree
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("rpsft")
except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
    __version__ = "0.1.0"

_EXPORTS = {
    "RotationAnchor": "anchor",
    "select_matrices": "selection",
    "resolve_ranks": "selection",
    "DEFAULT_TARGETS": "selection",
    "compute_bases": "bases",
    "load_model": "models",
    "load_tokenizer": "models",
    "load_config": "config",
    "Config": "config",
    "AnchoredSFTTrainer": "trainer",
    "AnchorMixin": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'rpsft' has no attribute {name!r}")
