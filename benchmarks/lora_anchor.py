"""Per-step cost of the RPSFT-on-LoRA anchor (Eq. 5): factored vs dense, at SmolLM2-135M shapes.

Setting: a random-init Llama with SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads,
so q,o: 576×576, k,v: 192×576, gate,up: 1536×576, down: 576×1536), wrapped by PEFT LoRA r=32, α=64 on the seven
projections, with random nonzero A and B (B = 0 at LoRA init would make every variant trivially cheap to reason
about, not to run). One anchor step adds λ·∇R to every lora_A / lora_B .grad and returns R. Three ways:

  factored   LoraRotationAnchor.accumulate_grad_: P = U_kᵀB, Q = AV_k, r×r Grams, closed-form dA, dB
             ≈ 2(m+n)·k·r multiply-adds per matrix (+ O(k·r²)); at full rank 2(m+n)·r² (no W0 touched)
  dense      the same closed form on the formed effective weight: W = W0 + s·BA, A_k = U_kᵀWV_k − diag σ_k,
             G = 2·U_k A_k V_kᵀ, dB = s·G·Aᵀ, dA = s·Bᵀ·G — ≈ m·n·(3r + 2k + …) multiply-adds
  autograd   the dense penalty on W0 + s·BA differentiated by autograd (what a straightforward port would do)

k is the anchor rank: 128 (configs/demo.yaml) and "full" (k = min(m, n): what the paper's k = 768 becomes on every
SmolLM2 matrix; the dense form then is ‖W0 + s·BA − W0‖², the factored one s²·tr((BᵀB)(AAᵀ))). Times are medians
over --reps interleaved repetitions; prints the ratios, writes JSON with --out.

    python benchmarks/lora_anchor.py [--layers 30] [--r 32] [--ranks 128,full] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def lora_layers(peft):
    base = peft.get_base_model()
    return {f"{name}.weight": mod for name, mod in base.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}


@torch.no_grad()
def dense_step(dense, layers, weight: float = 1.0) -> float:
    """The closed form on the formed W0 + s·BA, chained to A and B (the dense baseline)."""
    total = 0.0
    for name, t in dense.terms.items():
        mod = layers[name]
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        s = mod.scaling["default"]
        W = torch.addmm(mod.get_base_layer().weight, B, A, alpha=s)
        R = dense._residual(t, W)
        total += float(R.pow(2).sum())
        G = 2.0 * R if t.full else 2.0 * (t.U @ R) @ t.V.T
        B.grad.add_(G @ A.T, alpha=s * weight)
        A.grad.add_(B.T @ G, alpha=s * weight)
    return total


def autograd_step(dense, layers, weight: float = 1.0) -> float:
    total = 0.0
    for name, t in dense.terms.items():
        mod = layers[name]
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        W = mod.get_base_layer().weight + mod.scaling["default"] * (B @ A)
        r = dense._residual(t, W).pow(2).sum()
        (weight * r).backward()
        total += r.item()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha", type=int, default=64)
    ap.add_argument("--ranks", default="128,full", help="comma list of k; 'full' = min(m, n)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from rpsft.anchor import RotationAnchor
    from rpsft.methods.rpsft_lora import LoraRotationAnchor
    from rpsft.selection import DEFAULT_TARGETS

    model = smollm2_shaped(args.layers)
    ranks = [1.0 if k == "full" else int(k) for k in args.ranks.split(",")]
    t0 = time.perf_counter()
    denses = {k: RotationAnchor.from_model(model, rank=k, cache_dir=None) for k in ranks}
    bases_s = time.perf_counter() - t0
    peft = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                            target_modules=list(DEFAULT_TARGETS)))
    torch.manual_seed(1)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.02)
            p.grad = torch.zeros_like(p)
    layers = lora_layers(peft)

    print(f"SmolLM2-135M shapes, {args.layers} layers, LoRA r={args.r} α={args.alpha}, fp32, "
          f"{torch.get_num_threads()} threads (bases {bases_s:.1f} s)")
    results = []
    for k in ranks:
        dense = denses[k]
        fact = LoraRotationAnchor.from_dense(dense, peft)
        variants = {"factored": lambda: fact.accumulate_grad_(peft, 1.0),
                    "dense": lambda: dense_step(dense, layers), "autograd": lambda: autograd_step(dense, layers)}
        values = {v: fn() for v, fn in variants.items()}  # warm-up, and the three must agree
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.reps):
            for v, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        label = "full" if k == 1.0 else str(k)
        row = {"k": label, "matrices": len(fact), "seconds_median": {v: round(x, 5) for v, x in med.items()},
               "seconds_all": {v: [round(x, 5) for x in ts] for v, ts in times.items()},
               "ratio_dense_over_factored": round(med["dense"] / med["factored"], 2),
               "ratio_autograd_over_factored": round(med["autograd"] / med["factored"], 2),
               "penalty": values, "anchor_bytes": {"factored": fact.nbytes, "dense": dense.nbytes}}
        results.append(row)
        rel = max(abs(values[v] - values["factored"]) for v in values) / max(values["factored"], 1e-30)
        print(f"k={label:>4} on {len(fact)} matrices: factored {med['factored'] * 1e3:8.1f} ms | dense "
              f"{med['dense'] * 1e3:8.1f} ms ({row['ratio_dense_over_factored']:.1f}x) | autograd "
              f"{med['autograd'] * 1e3:8.1f} ms ({row['ratio_autograd_over_factored']:.1f}x) | R agree to {rel:.1e}"
              f" | anchor memory {fact.nbytes / 2**20:.1f} MiB factored vs {dense.nbytes / 2**20:.1f} MiB dense")
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, {"layers": args.layers, "r": args.r, "alpha": args.alpha,
                              "threads": torch.get_num_threads(), "bases_seconds": round(bases_s, 2),
                              "results": results})


if __name__ == "__main__":
    main()
