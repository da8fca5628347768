"""Model resolution: embedded names, directories, hub ids, and clear errors."""

from __future__ import annotations

import pytest

from rpsft.models import cache_root, load_model, parse_dtype, resolve


def test_directory_and_hub_ids(tiny_model_dir, tmp_path):
    assert resolve(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # passed through to from_pretrained
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="embedded"):
        resolve("smollm3")


def test_load_model_is_fp32_with_pad_token(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    assert tok.pad_token is not None


def test_dtype_and_cache_root(monkeypatch, tmp_path):
    assert str(parse_dtype("bf16")) == "torch.bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("fp8")
    monkeypatch.setenv("RPSFT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
