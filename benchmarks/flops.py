"""FLOP and memory model of the rotation anchor at the paper's scale (an estimate for machines without a GPU).

Per anchored m×n matrix and optimizer step (period s = 1), with k < min(m, n):

    residual  A = U_kᵀ W V_k − diag σ_k     2·m·n·k + 2·k²·min(m, n) FLOP (second product over the smaller side)
    gradient  G = 2·U_k A V_kᵀ              2·m·n·k + 2·k²·min(m, n) FLOP
    storage   U_k, σ_k, V_k                 (m + n + 1)·k numbers (fp32: ×4 bytes)
              lean frames (bf16/fp16)       (m + n)·k·2 + k·4 + k²·2 bytes (U_l, V_l; σ_k fp32, A_ref off-diagonal fp16)

with k clipped to min(m, n), and for a matrix whose k reaches min(m, n) the paper's R = ‖W − W0‖² (App. C.2, Eq. 11;
``anchor.full_rank=l2``, the default; with ``--full-rank eq3`` only a square one, where Eq. 3 has the same value, and
a non-square one keeps its full-rank bases): ≈ 3·m·n FLOP and an fp32 copy of W0 (m·n·4 bytes). A training step
on T tokens costs ≈ 6·N·T FLOP (N = parameters that take part in matmuls: all but the input embedding table) plus
causal attention, 6·L·seq·d_attn FLOP per token (QKᵀ and PV, forward + backward, halved by the causal mask).

Two ratios are printed: FLOP (hardware-independent), and an H100 time estimate that charges the step at bf16 dense
tensor-core peak × MFU and the anchor at its own arithmetic (IEEE fp32 on CUDA cores, fp64 tensor cores, or
3×TF32/3×bf16 splits); the assumed peaks and efficiencies are printed with the numbers. Under data/FSDP parallelism
the per-GPU step shrinks with the number of ranks, so the anchor must shrink with it (row-sharded anchor,
docs/math.md §10); if every rank computed every matrix the time ratio would be multiplied by the number of ranks.

    python benchmarks/flops.py [--rank 768] [--global-batch 16] [--seq-len 4096] [--period 1] [--full-rank l2|eq3]
                               [--out FILE]
"""

from __future__ import annotations

import argparse
import math

# name: (hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied embeddings)
SHAPES = {
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064, False),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 128, 151936, True),
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152, True),
}

# H100 SXM dense peaks (TFLOP/s, NVIDIA datasheet) and the efficiencies assumed for the time estimate
PEAK = {"bf16_tc": 989.0, "tf32_tc": 494.5, "fp64_tc": 66.9, "fp32": 66.9}
ANCHOR_ARITH = {  # strategy: (effective TFLOP/s for one useful product, note)
    "fp32 (IEEE, TF32 off)": (0.7 * PEAK["fp32"], "CUDA cores"),
    "fp64 tensor cores": (0.7 * PEAK["fp64_tc"], "DMMA; full-rate fp64 on A100/H100 only"),
    "3xTF32 split": (0.7 * PEAK["tf32_tc"] / 3, "≈ fp32 accuracy (precision table)"),
}


def projections(hidden: int, inter: int, heads: int, kv: int, hd: int) -> dict[str, tuple[int, int]]:
    """The seven anchored projections of one decoder layer as (out, in) = PyTorch weight shapes."""
    return {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
            "o_proj": (hidden, heads * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def anchor_cost(m: int, n: int, k: int, full_rank: str = "l2") -> tuple[float, float, bool]:
    """(FLOP per step, bytes in fp32, W0 kept) for one m×n matrix at requested rank k (rpsft.anchor.block_is_whole)."""
    if k >= min(m, n) and (full_rank == "l2" or m == n):
        return 3.0 * m * n, 4.0 * m * n, True
    k = min(k, m, n)
    return 4.0 * m * n * k + 4.0 * k * k * min(m, n), 4.0 * (m + n + 1) * k, False


def model_numbers(name: str, k: int, tokens: float, seq: int, period: int, mfu: float,
                  full_rank: str = "l2") -> dict:
    hidden, inter, layers, heads, kv, hd, vocab, tied = SHAPES[name]
    mats = projections(hidden, inter, heads, kv, hd)
    per_layer_params = sum(m * n for m, n in mats.values()) + 2 * hidden  # + RMSNorm weights
    n_matmul = layers * per_layer_params + vocab * hidden + hidden  # + LM head (tied or not, it is a matmul)
    n_total = n_matmul + (0 if tied else vocab * hidden)
    step_flop = 6.0 * n_matmul * tokens
    attn_flop = 6.0 * layers * seq * heads * hd * tokens  # QKᵀ and PV, causal-halved, fwd + bwd
    a_flop = a_bytes = a_lean = 0.0
    full, low = [], []
    for t, (m, n) in mats.items():
        f, b, is_full = anchor_cost(m, n, k, full_rank)
        a_flop += layers * f
        a_bytes += layers * b
        kk = min(k, m, n)
        a_lean += layers * (b if is_full else (m + n) * kk * 2 + kk * 4 + kk * kk * 2)  # rpsft.frames.anchor_nbytes
        (full if is_full else low).append(t)
    a_flop /= period
    total_step = step_flop + attn_flop
    t_step = total_step / (mfu * PEAK["bf16_tc"] * 1e12)
    times = {arith: a_flop / (eff * 1e12) for arith, (eff, _) in ANCHOR_ARITH.items()}
    return {"model": name, "params_total": n_total, "params_matmul": n_matmul, "k": k, "tokens_per_step": tokens,
            "seq_len": seq, "period": period, "full_rank": full_rank, "anchored_matrices": 7 * layers,
            "full_rank_types": full,
            "low_rank_types": low, "anchor_flop": a_flop, "step_flop_6NT": step_flop, "attention_flop": attn_flop,
            "flop_ratio_6NT": a_flop / step_flop, "flop_ratio_with_attention": a_flop / total_step,
            "anchor_bytes": a_bytes, "anchor_bytes_lean_frames": a_lean, "param_bytes_bf16": 2.0 * n_total,
            "w0_copy_bytes_fp32": 4.0 * layers * sum(m * n for m, n in mats.values()),
            "h100_step_seconds_est": t_step, "h100_anchor_seconds_est": times,
            "h100_time_ratio_est": {a: t / t_step for a, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-7b,llama-3.1-8b,qwen2.5-3b")
    ap.add_argument("--rank", type=int, default=768)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=4096, help="mean tokens per sequence (packed / unpadded)")
    ap.add_argument("--period", type=int, default=1, help="apply the anchor every s optimizer steps")
    ap.add_argument("--full-rank", choices=("l2", "eq3"), default="l2",
                    help="term of a matrix whose k reaches min(m, n): l2 = ‖W − W0‖² (the paper, default) | eq3")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the training step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tokens = args.global_batch * args.seq_len
    rows = [model_numbers(m.strip(), args.rank, tokens, args.seq_len, args.period, args.mfu, args.full_rank)
            for m in args.models.split(",") if m.strip()]
    print(f"k={args.rank}, period s={args.period}, tokens/step T = {args.global_batch} × {args.seq_len} = {tokens}; "
          f"step at {args.mfu:.0%} of {PEAK['bf16_tc']:.0f} TFLOP/s bf16; anchor arithmetic at 70% of its peak")
    for r in rows:
        print(f"\n{r['model']}: {r['params_total'] / 1e9:.2f} B params, {r['anchored_matrices']} anchored matrices "
              f"(W0 kept, at full rank: {', '.join(r['full_rank_types']) or 'none'})")
        print(f"  anchor     {r['anchor_flop'] / 1e12:8.2f} TFLOP/step   memory {r['anchor_bytes'] / 2**30:6.2f} GiB fp32 "
              f"(weights {r['param_bytes_bf16'] / 2**30:.1f} GiB bf16; fp32 W0 copy of these matrices "
              f"{r['w0_copy_bytes_fp32'] / 2**30:.1f} GiB)")
        print(f"  lean frames (anchor.frame_dtype=bf16/fp16): {r['anchor_bytes_lean_frames'] / 2**30:.2f} GiB "
              f"= {r['anchor_bytes_lean_frames'] / r['anchor_bytes']:.3f} × fp32 frames")
        print(f"  step 6NT   {r['step_flop_6NT'] / 1e12:8.1f} TFLOP   + attention {r['attention_flop'] / 1e12:.1f} TFLOP")
        print(f"  FLOP ratio {100 * r['flop_ratio_6NT']:.3f} % of 6NT, {100 * r['flop_ratio_with_attention']:.3f} % with "
              f"attention   (closed form 2k/(3·T·s) per matrix: {100 * 2 * args.rank / (3 * tokens * args.period):.3f} %)")
        print(f"  H100 estimate: step {r['h100_step_seconds_est']:.2f} s; anchor " + "; ".join(
            f"{a}: {t * 1e3:.0f} ms = {100 * r['h100_time_ratio_est'][a]:.2f} %"
            for a, t in r["h100_anchor_seconds_est"].items()))
        need = {a: max(1, math.ceil(v * args.period / 0.02)) for a, v in r["h100_time_ratio_est"].items()}
        r["period_for_2pct"] = need
        print("  period s for <= 2 % (H100 estimate): " + "; ".join(f"{a}: s={v}" for a, v in need.items()))
    print("\nmemory per matrix: (m + n + 1)·k·4 bytes (fp32 U_k, σ_k, V_k); m·n·4 bytes (W0) where k reaches min(m, n)"
          + (" on a square matrix (--full-rank eq3)" if args.full_rank == "eq3" else ""))
    print("under r-way sharding (FSDP2, row-sharded anchor) anchor FLOP and memory per GPU divide by r, like the step")
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, {"settings": vars(args), "models": rows})


if __name__ == "__main__":
    main()
