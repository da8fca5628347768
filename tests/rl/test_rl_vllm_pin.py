"""pyproject's [vllm] extra admits exactly the vLLM versions the installed TRL supports: its own [vllm] extra, and
the versions its runtime check (``trl.import_utils.is_vllm_available``) accepts without a warning."""

from __future__ import annotations

import tomllib
import warnings
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def ours():
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["vllm"]
    (req,) = [Requirement(r) for r in extra if Requirement(r).name == "vllm"]
    return req.specifier


def test_the_vllm_extra_is_trls():
    theirs = [Requirement(r) for r in requires("trl") or []]
    (trl_vllm,) = [r for r in theirs if r.name == "vllm" and r.marker and r.marker.evaluate({"extra": "vllm"})]
    assert ours() == trl_vllm.specifier


@pytest.mark.parametrize("version", ["0.10.0", "0.21.9", "0.22.0", "0.26.1", "0.31.0", "0.31.1", "0.32.0"])
def test_trl_accepts_exactly_the_pinned_versions(version, monkeypatch):
    import trl.import_utils as iu

    monkeypatch.setattr(iu, "_is_package_available", lambda name, return_version=False: (True, version))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert iu.is_vllm_available()
    unsupported = any("supports vLLM versions" in str(w.message) for w in caught)
    assert unsupported == (version not in ours())
