"""Plumbing shared by the analyses: which matrices, reading only the needed tensors of a checkpoint, and turning
records into token ids through the tokenizer's chat template.

Kept apart from the analyses so each of those stays one job (the math), and so the weight-only analyses
(rotation) never instantiate a real model: parameter names come from a meta-device model built from the config,
tensors are read one at a time from the safetensors files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..selection import DEFAULT_TARGETS, candidate_matrices, layer_index, matrix_type, select_matrices

__all__ = ["DEFAULT_TARGETS", "layer_index", "matrix_type", "parse_csv", "matrix_names", "check_comparable",
           "WeightReader", "Encoded", "encode_records", "prompt_texts", "completion_nll", "pad_batch"]


def parse_csv(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = [str(v).strip() for v in value if str(v).strip()]
    return items or None


def _meta_model(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device: parameter names and shapes without memory or load time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def matrix_names(model_or_path, targets=None, layers=None) -> list[tuple[str, tuple[int, int]]]:
    """(parameter name, shape) of the selected matrices, through :func:`rpsft.selection.select_matrices`."""
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
    else:
        from ..models import resolve

        model = _meta_model(resolve(str(model_or_path)))
    return [(n, tuple(p.shape)) for n, p in select_matrices(model, targets, layers)]


def _checkpoint_tree(spec: str) -> torch.nn.Module:
    """The meta-device module tree of a checkpoint (no weights read). A PEFT adapter directory has its base
    model's tree: merging W0 + s·BA keeps every name and shape."""
    from ..models import resolve

    p = Path(spec).expanduser()
    if p.is_dir() and (p / "adapter_config.json").is_file() and not WeightReader._has_weights(p):
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{p / 'adapter_config.json'} names no base model (base_model_name_or_path); pass the "
                             f"merged checkpoint instead")
        return _checkpoint_tree(str(base))
    return _meta_model(resolve(str(spec)))


def check_comparable(base: str, tuned: list[str], targets=None, layers=None) -> list[tuple[str, tuple[int, int]]]:
    """The base's selected (parameter name, shape) pairs, once every tuned checkpoint is known to be comparable
    with it: the same number of layers, and every selected matrix under the same name with the same shape.

    Checked once, up front, from each checkpoint's config on the meta device (no weights read), for every analysis
    that compares checkpoints (rotation, first-order, drift, blocks): a checkpoint of another architecture is one
    line naming the first differing matrix with both shapes, instead of a traceback halfway through or, for a
    deeper model, its extra layers left out without a word."""
    same = "compare checkpoints fine-tuned from the base (same architecture)"
    tree = _checkpoint_tree(base)
    chosen = [(n, tuple(p.shape)) for n, p in select_matrices(tree, targets, layers)]
    n_layers = len({layer_index(n) for n, _ in candidate_matrices(tree)} - {None})
    for t in tuned:
        shapes = {n: tuple(p.shape) for n, p in candidate_matrices(_checkpoint_tree(t))}
        t_layers = len({layer_index(n) for n in shapes} - {None})
        if t_layers != n_layers:
            raise ValueError(f"{t} has {t_layers} layers and the base {base} has {n_layers}; {same}")
        for name, shape in chosen:
            if name not in shapes:
                raise ValueError(f"{t} has no matrix {name} (the base {base} has {shape}); {same}")
            if shapes[name] != shape:
                raise ValueError(f"{t}: {name} has shape {shapes[name]} and the base {base} has {shape}; {same}")
    return chosen


class WeightReader:
    """Reads single tensors of a checkpoint (``model.safetensors`` or a sharded index) in fp32.

    A PEFT adapter directory (``adapter_config.json``, no full weights) is merged into its base model once, in
    memory, because its effective weight W0 + BA·s is what the analyses compare.
    """

    def __init__(self, name_or_path: str):
        from ..models import resolve

        self.spec = str(name_or_path)
        self._merged: dict[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        p = Path(name_or_path).expanduser()
        if p.is_dir() and (p / "adapter_config.json").is_file() and not self._has_weights(p):
            self.path = p
            self._merged = self._merge_adapter(p)
            return
        self.path = Path(resolve(self.spec))
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{self.spec}: the analyses read weights from a local checkpoint directory (save_pretrained / "
                f"`rpsft train` output) or an embedded model name; hub ids are not downloaded here")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: self.path / v for k, v in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.path} holds no *.safetensors weights; re-save the checkpoint with "
                    f"save_pretrained(..., safe_serialization=True)")
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._files[k] = f

    @staticmethod
    def _has_weights(p: Path) -> bool:
        return (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()

    @staticmethod
    def _merge_adapter(p: Path) -> dict[str, torch.Tensor]:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        merged = model.merge_and_unload()
        return {k: v.detach().float() for k, v in merged.state_dict().items()}

    def keys(self) -> list[str]:
        return list(self._merged) if self._merged is not None else list(self._files)

    def get(self, name: str) -> torch.Tensor:
        if self._merged is not None:
            if name not in self._merged:
                raise KeyError(f"{self.spec}: merged adapter model has no tensor {name!r}")
            return self._merged[name]
        f = self._files.get(name)
        if f is None:
            close = [k for k in self._files if matrix_type(k) == matrix_type(name)][:3]
            raise KeyError(f"{self.spec}: checkpoint has no tensor {name!r} (same-type keys: {close}); "
                           f"is it a checkpoint of the same architecture as the base?")
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            return h.get_tensor(name).float()


@dataclass
class Encoded:
    input_ids: list[int]
    completion_start: int  # index of the first completion token (== len(input_ids) for prompt-only encodings)


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # a base model without a chat template: plain concatenation, which is how such models are prompted anyway
    text = "\n\n".join(m["content"] for m in messages)
    return text + ("\n\n" if add_generation_prompt else "")


def prompt_texts(tokenizer, records: list[dict]) -> list[str]:
    """The prompt of each record through the chat template, ending in the assistant header (for generation)."""
    return [_chat(tokenizer, r["prompt"], add_generation_prompt=True) for r in records]


def encode_records(tokenizer, records: list[dict], max_length: int | None = None,
                   with_completion: bool = True) -> list[Encoded]:
    """Token ids of prompt (+ completion) per record; ``completion_start`` marks the supervised part, as TRL's
    prompt-completion loss does. Sequences longer than ``max_length`` are cut at the end (completion tail)."""
    out = []
    for r in records:
        p_ids = tokenizer(_chat(tokenizer, r["prompt"], True), add_special_tokens=False)["input_ids"]
        if with_completion:
            full = _chat(tokenizer, r["prompt"] + r["completion"], False)
            if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token:
                full += tokenizer.eos_token
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            start = 0  # longest common prefix: robust to templates whose generation header differs slightly
            while start < min(len(ids), len(p_ids)) and ids[start] == p_ids[start]:
                start += 1
        else:
            ids, start = p_ids, len(p_ids)
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
        if with_completion and start >= len(ids):
            raise ValueError(
                f"a record's prompt fills all {max_length} tokens, leaving no completion tokens to take a loss on; "
                f"raise --max-length (prompt length {len(p_ids)})")
        out.append(Encoded(ids, start))
    return out


def completion_nll(model, batch: list[Encoded], pad_id: int) -> torch.Tensor:
    """Per-sample mean NLL over completion tokens (right padding; causal attention keeps pads out of the real
    positions' computation, so each sample's loss and gradient equal its unpadded ones). Returns shape (B,)."""
    device = next(model.parameters()).device
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        labels[i, e.completion_start:n] = ids[i, e.completion_start:n]
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    # Only positions that predict a completion token need the (vocab-sized) lm_head: logits_to_keep saves
    # roughly the prompt's share of that matmul. Models without the argument get full logits.
    keep = L - max(min(e.completion_start for e in batch) - 1, 0)
    try:
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
    except TypeError:
        logits = model(input_ids=ids, attention_mask=attn).logits
    keep = logits.shape[1]
    logits = logits[:, :-1].float()
    target = labels[:, L - keep + 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    mask = (target != -100).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pad_batch(tokenizer, texts: list[str], device, side: str = "left") -> dict:
    """Padded batch. Left for generation (decoder-only models continue from the last position; generate() derives
    position ids from the mask); right for plain forwards, where causal attention keeps trailing pads from
    touching real positions and position ids stay 0..n-1 without help."""
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = saved
    return {k: v.to(device) for k, v in enc.items()}


def checkpoint_label(spec: str) -> str:
    """Legend label: the directory name, with its run directory for Trainer's ``checkpoint-N`` subfolders."""
    p = Path(spec)
    if not p.exists():
        return spec
    p = p.resolve()
    return f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint-") else p.name
