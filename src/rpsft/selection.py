"""Which weight matrices the anchor holds, and with which k.

Targets are module-name patterns matched against 2-D ``*.weight`` parameters:

* a plain word (``q_proj``) matches a dotted component of the module name;
* a glob (``model.layers.1*.mlp.*``) is matched with fnmatch against the module name;
* ``re:<regex>`` is searched in the module name.

The default is the seven projections of a Llama/Qwen block (the paper's "attention and MLP projections").
Embeddings and ``lm_head`` are selected only when a target names them.

k may be an int (clipped to min(m, n); the paper's k=768 is larger than every SmolLM2 matrix), a float in
(0, 1] meaning a fraction of min(m, n), a mapping pattern -> k (first match wins; ``"*"`` is the fallback), or
``"@ranks.json"``: a per-matrix map written by ``rpsft analyze energy``.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class SelectionError(ValueError):
    """Bad targets / layers / rank specification; the message lists what would have been valid."""


def module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def matrix_type(param_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj`` (PEFT's ``.base_layer`` is skipped)."""
    parts = [p for p in module_name(param_name).split(".") if p != "base_layer"]
    return parts[-1] if parts else param_name


def layer_index(param_name: str) -> int | None:
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def pattern_matches(pattern: str, param_name: str) -> bool:
    mod = module_name(param_name)
    if pattern.startswith("re:"):
        return re.search(pattern[3:], mod) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(mod, pattern) or fnmatch.fnmatchcase(param_name, pattern)
    return pattern == mod or pattern == param_name or pattern in mod.split(".")


def candidate_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Every trainable 2-D weight (tied weights appear once, under their first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and n.endswith(".weight")]


def parse_layers(layers: Any) -> set[int] | None:
    """``None`` (all), an int, a list of ints, or a string like ``"0-9,20,28-29"``."""
    if layers is None or layers == "" or layers == "all":
        return None
    if isinstance(layers, bool):
        raise SelectionError(f"layers={layers!r}: give layer indices like [0, 1] or a range string '0-9,20'")
    if isinstance(layers, int):
        return {layers}
    if isinstance(layers, str):
        out: set[int] = set()
        for part in layers.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise SelectionError(f"layers={layers!r}: cannot parse {part!r}; use e.g. '0-9,20'") from None
        return out
    if isinstance(layers, Iterable):
        try:
            return {int(x) for x in layers}
        except (TypeError, ValueError):
            raise SelectionError(f"layers={layers!r}: every entry must be a layer index") from None
    raise SelectionError(f"layers={layers!r}: give layer indices like [0, 1] or a range string '0-9,20'")


def select_matrices(model: torch.nn.Module, targets: Iterable[str] | str | None = None,
                    layers: Any = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs matched by ``targets`` (default: the seven projections) within ``layers``."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets) if targets is not None else list(DEFAULT_TARGETS)
    if not targets:
        raise SelectionError("targets is empty; name at least one module pattern, e.g. q_proj")
    layer_set = parse_layers(layers)
    candidates = candidate_matrices(model)
    chosen = []
    for name, p in candidates:
        if not any(pattern_matches(t, name) for t in targets):
            continue
        li = layer_index(name)
        if layer_set is not None and li is not None and li not in layer_set:
            continue
        chosen.append((name, p))
    if not chosen:
        types = sorted({matrix_type(n) for n, _ in candidates})
        example = [n for n, _ in candidates[:6]]
        hint = ""
        if any(matrix_type(t) == "lm_head" for t in targets):
            hint = " (lm_head may be tied to the input embeddings: target embed_tokens instead)"
        raise SelectionError(
            f"targets {targets} (layers={layers!r}) match no 2-D weight{hint}. Candidate matrix types: {types}; "
            f"e.g. {example}"
        )
    return chosen


def _k_from_spec(spec: Any, shape: tuple[int, int], where: str) -> int:
    full = min(shape)
    if isinstance(spec, bool) or spec is None:
        raise SelectionError(f"{where}: rank {spec!r} is not a number; use an int k >= 0 or a fraction in (0, 1]")
    if isinstance(spec, str):
        try:
            spec = float(spec) if any(c in spec for c in ".eE") else int(spec)
        except ValueError:
            raise SelectionError(f"{where}: rank {spec!r} is not a number") from None
    if isinstance(spec, int):
        if spec < 0:
            raise SelectionError(f"{where}: rank {spec} is negative; use k >= 0 (0 = plain SFT)")
        return min(spec, full)
    if isinstance(spec, float):
        if not (0.0 < spec <= 1.0) or math.isnan(spec):
            raise SelectionError(f"{where}: a fractional rank must lie in (0, 1] (fraction of min(m, n)); got {spec}")
        return max(1, min(full, round(spec * full)))
    raise SelectionError(f"{where}: rank {spec!r} must be an int, a fraction in (0, 1], a mapping, or '@file.json'")


def load_rank_file(path: str | Path) -> dict:
    path = Path(str(path).lstrip("@")).expanduser()
    if not path.is_file():
        raise SelectionError(f"rank map file {path} does not exist (write one with `rpsft analyze energy`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SelectionError(f"rank map file {path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict) and "ranks" in data and isinstance(data["ranks"], dict):
        data = data["ranks"]
    if not isinstance(data, dict) or not data:
        raise SelectionError(f"rank map file {path} must hold a JSON object parameter-name -> k")
    return data


def unmatched_keys(rank: dict, names: list[str]) -> list[str]:
    """The keys of a rank mapping (``"*"`` aside) that name no matrix in ``names``, exactly or as a pattern."""
    return [key for key in rank if key != "*" and key not in names
            and not any(pattern_matches(str(key), n) for n in names)]


def resolve_ranks(matrices: list[tuple[str, tuple[int, int]]], rank: Any,
                  known: Iterable[str] | None = None) -> dict[str, int]:
    """k per matrix name from an int / fraction / mapping / '@file.json' spec.

    A rank map file (``"@ranks.json"``, or ``{"@": "ranks.json", "*": 128}`` for a uniform k elsewhere) may
    cover only some of the selected matrices (``rpsft analyze energy --matrices q_proj --layers 0``): the
    others fall back to the mapping's ``"*"`` entry, or are left unanchored (k = 0); the log says which.

    Every key of a mapping but ``"*"`` must name a matrix of the model (``known``: every 2-D weight's name,
    default the selected ones): a key may cover a matrix outside the selection (a whole-model map used with
    ``anchor.layers``), but one that matches nothing is a typo or a map written for another model, and is
    refused with the closest real names; quietly, such a map would anchor nothing and train plain SFT."""
    from_file = None
    if isinstance(rank, str) and rank.startswith("@"):
        from_file, rank = rank[1:], load_rank_file(rank)
    elif isinstance(rank, dict) and "@" in rank:
        from_file = str(rank["@"]).lstrip("@")
        rank = {**load_rank_file(from_file), **{k: v for k, v in rank.items() if k != "@"}}
    if isinstance(rank, dict):
        names = list(known) if known is not None else [n for n, _ in matrices]
        bad = unmatched_keys(rank, names)
        if bad:
            close = list(dict.fromkeys(c for key in bad for c in difflib.get_close_matches(str(key), names, n=1,
                                                                                          cutoff=0.0)))
            more = f" (and {len(bad) - 6} more)" if len(bad) > 6 else ""
            source = f" in {from_file}" if from_file is not None else ""
            raise SelectionError(
                f"rank map keys {bad[:6]}{more}{source} match no matrix of the model (closest real names: "
                f"{close[:6]}); fix the keys, or write a map for this model with `rpsft analyze energy --model MODEL`")
    if isinstance(rank, dict) and from_file is not None:
        absent = [n for n, _ in matrices if n not in rank
                  and not any(p != "*" and pattern_matches(p, n) for p in rank)]
        if absent:
            import logging

            how = f"anchored at k = {rank['*']} (its '*' entry)" if "*" in rank else \
                "left unanchored (k = 0; add a '*' entry, e.g. anchor.rank={'@': FILE, '*': 128}, to anchor them)"
            logging.getLogger("rpsft").warning(
                "rank map %s covers %d of %d selected matrices; the other %d are %s",
                from_file, len(matrices) - len(absent), len(matrices), len(absent), how)
            if "*" not in rank:
                rank = {**rank, "*": 0}
    if isinstance(rank, dict):
        out = {}
        for name, shape in matrices:
            if name in rank:
                out[name] = _k_from_spec(rank[name], shape, f"rank[{name!r}]")
                continue
            for pattern, spec in rank.items():
                if pattern != "*" and pattern_matches(pattern, name):
                    out[name] = _k_from_spec(spec, shape, f"rank[{pattern!r}]")
                    break
            else:
                if "*" not in rank:
                    close = difflib.get_close_matches(name, list(rank), n=1)
                    raise SelectionError(
                        f"rank map has no entry for {name}" + (f" (closest key: {close[0]})" if close else "")
                        + f"; add it, or a '*' fallback. Keys: {list(rank)[:6]}"
                    )
                out[name] = _k_from_spec(rank["*"], shape, "rank['*']")
        return out
    return {name: _k_from_spec(rank, shape, "rank") for name, shape in matrices}
