"""Output entropy (paper App. F.4): how confident a model's own greedy continuations are.

Each prompt is decoded greedily for up to 128 new tokens; at every generated step the entropy (nats) of the
full next-token distribution softmax(logits) is recorded, and a sample's value is the mean over its generated
tokens up to and including its end-of-sequence token. The distribution over samples is shown as a Gaussian KDE
with Silverman's rule-of-thumb bandwidth h = 1.06 · s · N^(-1/5) (s: sample standard deviation).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ._common import checkpoint_label, pad_batch, prompt_texts


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) along the last axis: logsumexp(l) − Σ p·l."""
    logits = logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def generation_entropies(model, tokenizer, texts: list[str], max_new_tokens: int = 128,
                         batch_size: int = 16) -> tuple[list[float], list[int]]:
    """(mean token entropy per sample, generated length per sample) under greedy decoding."""
    device = next(model.parameters()).device
    model.eval()
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    means, lengths = [], []
    for i in range(0, len(texts), batch_size):
        enc = pad_batch(tokenizer, texts[i:i + batch_size], device, side="left")
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad, temperature=None, top_p=None,
                             top_k=None)
        gen = out.sequences[:, enc["input_ids"].shape[1]:]
        H = torch.stack([token_entropy(l) for l in out.logits], dim=1)  # (B, T) entropies of raw logits
        for b in range(gen.shape[0]):
            n = gen.shape[1]
            for t in range(gen.shape[1]):  # count up to and including the first EOS; later steps are padding
                if int(gen[b, t]) in eos_ids:
                    n = t + 1
                    break
            means.append(float(H[b, :n].mean()))
            lengths.append(n)
    return means, lengths


def silverman_bandwidth(x) -> float:
    """h = 1.06 · s · N^(-1/5) with s the (ddof = 1) sample standard deviation."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"a KDE bandwidth needs at least 2 samples, got {x.size}; raise --limit")
    s = float(np.std(x, ddof=1))
    return 1.06 * s * x.size ** (-0.2)


def gaussian_kde(x, grid, bandwidth: float | None = None) -> np.ndarray:
    """f(g) = 1/(N h) Σ_i φ((g − x_i)/h), φ the standard normal density."""
    x = np.asarray(x, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    h = silverman_bandwidth(x) if bandwidth is None else float(bandwidth)
    if not h > 0:  # all samples equal: the density is a spike; report it as such instead of dividing by 0
        h = max(1e-3, 1e-3 * abs(float(x.mean())))
    z = (grid[:, None] - x[None, :]) / h
    return np.exp(-0.5 * z * z).sum(1) / (x.size * h * math.sqrt(2 * math.pi))


def kde_summary(values: list[float], points: int = 200) -> dict:
    v = np.asarray(values, dtype=np.float64)
    h = silverman_bandwidth(v)
    pad = 3 * h if h > 0 else 0.5
    grid = np.linspace(v.min() - pad, v.max() + pad, points)
    return {"bandwidth": h, "grid": grid.tolist(), "density": gaussian_kde(v, grid, h).tolist()}


def run_entropy(models: list[str], data: str, limit: int = 32, max_new_tokens: int = 128, batch_size: int = 16,
                labels: list[str] | None = None, progress=None) -> dict:
    from ..data.formats import load_records
    from ..models import load_model

    if labels is not None and len(labels) != len(models):
        raise ValueError(f"--labels has {len(labels)} entries for {len(models)} models; give one per --model")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 1 (paper: 128)")
    labels = labels or [checkpoint_label(m) for m in models]
    records = load_records(data, limit=limit)
    out = []
    for lab, name in zip(labels, models):
        t0 = time.time()
        model, tok = load_model(name)
        texts = prompt_texts(tok, records)
        ent, lens = generation_entropies(model, tok, texts, max_new_tokens, batch_size)
        del model
        out.append({"label": lab, "path": name, "entropies": ent, "lengths": lens,
                    "mean": float(np.mean(ent)), "std": float(np.std(ent, ddof=1)) if len(ent) > 1 else 0.0,
                    "kde": kde_summary(ent) if len(ent) > 1 else None, "seconds": round(time.time() - t0, 2)})
        if progress:
            progress(len(out), len(models))
    return {"data": str(data), "samples": len(records), "max_new_tokens": max_new_tokens, "models": out}
