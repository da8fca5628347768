"""Representation drift (paper App. F.6 / Fig. 8): where fine-tuning moved the model's pooled hidden states.

Each prompt (chat template, generation header included) is encoded by each model; the last layer's hidden
states are mean-pooled over real tokens (padding masked out). Per model we report the centroid's Euclidean
distance to the base centroid, and a 2-D PCA of all points together (one shared projection, fitted on every
model's points) with an arrow from the base centroid to each tuned centroid. PCA is affine, so the projected
centroid equals the centroid of the projected points: the arrows start exactly at the base cloud's centre.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._common import check_comparable, checkpoint_label, pad_batch, prompt_texts


@torch.no_grad()
def pooled_hidden(model, tokenizer, texts: list[str], batch_size: int = 8) -> np.ndarray:
    """(N, hidden) mean of the last hidden layer over non-padding tokens."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = pad_batch(tokenizer, texts[i:i + batch_size], device, side="right")
        h = model(**enc, output_hidden_states=True).hidden_states[-1].double()
        m = enc["attention_mask"].unsqueeze(-1).double()
        out.append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy())
    return np.concatenate(out)


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coords N×2, components 2×d, mean d) by SVD of the centred points."""
    mean = points.mean(0)
    _, _, Vt = np.linalg.svd(points - mean, full_matrices=False)
    comps = Vt[:2]
    if comps.shape[0] < 2:  # a single point or 1-D data: pad with a zero axis so plots still work
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], points.shape[1]))])
    return (points - mean) @ comps.T, comps, mean


def drift_summary(base: np.ndarray, tuned: dict[str, np.ndarray]) -> dict:
    """Centroid distances and the shared 2-D PCA with arrows (start = base centroid, end = tuned centroid)."""
    labels = ["base", *tuned]
    clouds = [base, *tuned.values()]
    coords, comps, mean = pca_2d(np.concatenate(clouds))
    bounds = np.cumsum([0] + [len(c) for c in clouds])
    per = {lab: coords[bounds[i]:bounds[i + 1]] for i, lab in enumerate(labels)}
    c_base = base.mean(0)
    start = (c_base - mean) @ comps.T
    models = []
    for lab, pts in tuned.items():
        c = pts.mean(0)
        end = (c - mean) @ comps.T
        models.append({"label": lab, "centroid_distance": float(np.linalg.norm(c - c_base)),
                       "relative_distance": float(np.linalg.norm(c - c_base) / max(np.linalg.norm(c_base), 1e-12)),
                       "mean_sample_shift": float(np.linalg.norm(pts - base, axis=1).mean())
                       if pts.shape == base.shape else None,
                       "arrow_start": start.tolist(), "arrow_end": end.tolist()})
    total = float(np.var(np.concatenate(clouds) - mean, axis=0).sum())
    expl = [float(np.var(coords[:, j]) / total) if total > 0 else 0.0 for j in range(2)]
    return {"models": models, "pca": {"explained_variance_ratio": expl,
                                      "points": {lab: p.tolist() for lab, p in per.items()}}}


def run_drift(base: str, tuned: list[str], data: str, limit: int = 64, batch_size: int = 8,
              labels: list[str] | None = None) -> dict:
    from ..data.formats import load_records
    from ..models import load_model

    if labels is not None and len(labels) != len(tuned):
        raise ValueError(f"--labels has {len(labels)} entries for {len(tuned)} checkpoints; give one per --tuned")
    if labels is not None and "base" in labels:
        raise ValueError("--labels: 'base' is reserved for the base model; choose other names")
    labels = labels or [checkpoint_label(t) if checkpoint_label(t) != "base" else t for t in tuned]
    if len(set(labels)) != len(labels):
        raise ValueError(f"checkpoint labels {labels} are not unique; pass --labels with one distinct name each")
    check_comparable(base, tuned)  # same layers and matrices: hidden states of one shape, from the same model
    t0 = time.time()
    records = load_records(data, limit=limit)
    model, tok = load_model(base)
    texts = prompt_texts(tok, records)
    base_h = pooled_hidden(model, tok, texts, batch_size)
    del model
    tuned_h = {}
    for lab, t in zip(labels, tuned):
        m, _ = load_model(t)
        tuned_h[lab] = pooled_hidden(m, tok, texts, batch_size)
        del m
    return {"base": base, "data": str(data), "samples": len(texts), **drift_summary(base_h, tuned_h),
            "seconds": round(time.time() - t0, 2)}
