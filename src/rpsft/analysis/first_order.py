"""First-order view of what an update did to the base loss (paper App. F.2 / Fig. 5).

With g_W the mean gradient of the base model's completion NLL on a batch, ⟨g_W, W_tuned − W_base⟩ is the
first-order Taylor change of that loss caused by the fine-tuning update of matrix W (negative: the update moved
downhill on this data). The paper plots its per-layer mean over the projection types.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._common import (Encoded, WeightReader, check_comparable, checkpoint_label, completion_nll, encode_records,
                      layer_index, matrix_type)


def mean_gradient(model, tokenizer, encoded: list[Encoded], params: list[tuple[str, torch.nn.Parameter]],
                  batch_size: int = 4) -> dict[str, torch.Tensor]:
    """g_W = mean over samples of ∇ (per-sample mean completion NLL), for the chosen matrices only."""
    chosen = {id(p) for _, p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for _, p in params:
            p.grad = None
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i:i + batch_size]
            (completion_nll(model, batch, pad).sum() / len(encoded)).backward()
        return {n: p.grad.detach().clone() for n, p in params}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)


def inner_products(grads: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | WeightReader,
                   tuned: WeightReader) -> list[dict]:
    rows = []
    for name, g in grads.items():
        Wb = base[name] if isinstance(base, dict) else base.get(name)
        delta = tuned.get(name).double() - Wb.double()
        rows.append({"name": name, "type": matrix_type(name), "layer": layer_index(name),
                     "inner": float((g.double() * delta).sum()),
                     "grad_norm": float(g.double().norm()), "delta_norm": float(delta.norm())})
    return rows


def per_layer(rows: list[dict]) -> list[dict]:
    layers: dict[int, list[float]] = {}
    for r in rows:
        if r["layer"] is not None:
            layers.setdefault(r["layer"], []).append(r["inner"])
    return [{"layer": li, "types": len(v), "mean_inner": float(np.mean(v))} for li, v in sorted(layers.items())]


def run_first_order(base: str, tuned: list[str], data: str, targets=None, layers=None, limit: int = 16,
                    batch_size: int = 4, max_length: int = 1024, labels: list[str] | None = None) -> dict:
    from ..data.formats import load_records
    from ..models import load_model
    from ..selection import select_matrices

    if labels is not None and len(labels) != len(tuned):
        raise ValueError(f"--labels has {len(labels)} entries for {len(tuned)} checkpoints; give one per --tuned")
    labels = labels or [checkpoint_label(t) for t in tuned]
    check_comparable(base, tuned, targets, layers)  # before the model loads: same layers, names and shapes
    t0 = time.time()
    model, tok = load_model(base)
    params = select_matrices(model, targets, layers)
    encoded = encode_records(tok, load_records(data, limit=limit), max_length=max_length)
    grads = mean_gradient(model, tok, encoded, params, batch_size=batch_size)
    base_w = {n: p.detach().float() for n, p in params}
    out = []
    for label, t in zip(labels, tuned):
        rows = inner_products(grads, base_w, WeightReader(t))
        out.append({"label": label, "path": t, "matrices": rows, "layers": per_layer(rows),
                    "total_inner": float(sum(r["inner"] for r in rows))})
    return {"base": base, "data": str(data), "samples": len(encoded), "checkpoints": out,
            "seconds": round(time.time() - t0, 2)}
