"""Precision of the anchor residual A = U_kᵀWV_k − diag σ_k and of ∇R = 2·U_k A V_kᵀ at realistic drift (issue 6.1).

Setting: real SmolLM2-135M-Instruct matrices (the seven projections of a few layers; the embedded checkpoint,
de-quantised from the Q4_1 GGUF, not the original bf16 weights: docs/eval.md), bases from
``rpsft.bases.compute_bases`` (exact SVD, fp32 U/V, Rayleigh-refined σ — exactly what the anchor stores). The weight
is moved as a few AdamW steps at lr 1e-6 would move it: each step changes every entry by lr·(0.5·g + 0.5·ξ_t) with a
fixed sign pattern g = ±1 (Adam's m/√v is ≈ ±1 on a persistent gradient) and fresh noise ξ_t ∈ [−1, 1], so after s
steps |ΔW| ≈ 1e-6·(0.5·s + 0.5·√s) — 1e-6 … 5e-5 for s = 1 … 100 — and W = W0 + ΔW is rounded to fp32 as a
master weight would be. For every strategy of ``rpsft.precision`` it reports, against the fp64 computation on the
same fp32 U, σ, V, W: the relative error of R = ‖A‖² and of ∇R (Frobenius), median and worst over matrices, and the
CPU time of one (R, ∇R) pass over all the matrices (median of interleaved repetitions; tf32 rows are emulated for
accuracy only — their speed needs a CUDA tensor core).

    python benchmarks/precision.py [--layers 0,15,29] [--rank 128,384] [--steps 0,1,10,100] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def drifted(W0: torch.Tensor, steps: int, lr: float, gen: torch.Generator) -> torch.Tensor:
    """W0 moved by ``steps`` AdamW-like updates of size ≈ lr per entry, kept in fp32 like a master weight."""
    if steps == 0:
        return W0.clone()
    g = torch.randint(0, 2, W0.shape, generator=gen).float() * 2 - 1
    delta = torch.zeros_like(W0, dtype=torch.float64)
    for _ in range(steps):
        xi = torch.rand(W0.shape, generator=gen, dtype=torch.float64) * 2 - 1
        delta += lr * (0.5 * g + 0.5 * xi)
    # One fp32 rounding of the total: a per-step fp32 master weight adds ulp(W)/2 ≈ 3e-9·|W| per step, three orders
    # below lr, so the drift is the same to < 1 %.
    return (W0.double() + delta).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="0,15,29", help="comma-separated decoder layers (all 7 projections each)")
    ap.add_argument("--rank", default="128,384", help="comma-separated k (clipped; full-rank matrices skipped)")
    ap.add_argument("--steps", default="0,1,10,100", help="simulated optimizer steps at --lr")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions per strategy")
    ap.add_argument("--strategies", default=",".join(("fp64", "fp32", "tf32", "tf32x3", "bf16", "bf16x3")))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from rpsft.bases import compute_bases
    from rpsft.models import load_model
    from rpsft.precision import EMULATED_ON_CPU, penalty_and_grad, strategy_fn
    from rpsft.selection import select_matrices

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    layers = [int(x) for x in args.layers.split(",")]
    ranks = [int(x) for x in args.rank.split(",")]
    steps_list = [int(x) for x in args.steps.split(",")]
    model, _ = load_model(args.model)
    mats = [(n, p.detach().float().clone()) for n, p in select_matrices(model, None, layers)]
    del model
    print(f"{args.model}: {len(mats)} matrices (layers {layers}), lr {args.lr:g}, steps {steps_list}, "
          f"{torch.get_num_threads()} threads")

    results = {"model": args.model, "layers": layers, "lr": args.lr, "threads": torch.get_num_threads(),
               "matrices": [n for n, _ in mats], "by_rank": {}}
    gen = torch.Generator().manual_seed(0)
    for k_req in ranks:
        terms = []
        for name, W0 in mats:
            k = min(k_req, min(W0.shape))
            if k >= min(W0.shape):
                continue  # full rank is W − W0 (L2-Init): no cancellation inside a matmul, nothing to measure
            b = compute_bases(W0, k)
            terms.append((name, W0, b.U, b.S, b.V))
        errs: dict[int, dict[str, dict[str, list[float]]]] = {}
        r_ref_tot: dict[int, float] = {}
        for s in steps_list:
            Ws = [drifted(W0, s, args.lr, gen) for _, W0, *_ in terms]
            errs[s] = {st: {"R": [], "grad": []} for st in strategies}
            tot_ref, tot = 0.0, {st: 0.0 for st in strategies}
            for (name, W0, U, S, V), W in zip(terms, Ws):
                r_ref, g_ref = penalty_and_grad(U, S, V, W, "fp64")
                tot_ref += r_ref
                gn = float(g_ref.norm())
                for st in strategies:
                    r, g = penalty_and_grad(U, S, V, W, st)
                    tot[st] += r
                    errs[s][st]["R"].append(abs(r - r_ref) / max(r_ref, 1e-300))
                    errs[s][st]["grad"].append(float((g.double() - g_ref).norm()) / max(gn, 1e-300))
            r_ref_tot[s] = tot_ref
            for st in strategies:
                errs[s][st]["R_total"] = abs(tot[st] - tot_ref) / max(tot_ref, 1e-300)

        # speed: one (R, ∇R) pass over all matrices per strategy, interleaved so machine noise hits all alike
        Wt = [drifted(W0, 10, args.lr, gen) for _, W0, *_ in terms]
        fns = {st: strategy_fn(st) for st in strategies}
        times: dict[str, list[float]] = {st: [] for st in strategies}
        for rep in range(args.reps + 1):
            for st in strategies:
                t = time.perf_counter()
                for (_, _, U, S, V), W in zip(terms, Wt):
                    fns[st](U, S, V, W)
                if rep:  # first round is warm-up
                    times[st].append(time.perf_counter() - t)
        med_t = {st: statistics.median(v) for st, v in times.items()}

        block = {"k": k_req, "matrices": len(terms), "R_ref_total": r_ref_tot, "strategies": {}}
        print(f"\nk={k_req}: {len(terms)} low-rank matrices; R_ref (sum) by steps: "
              + ", ".join(f"{s}: {r_ref_tot[s]:.3e}" for s in steps_list))
        head = f"{'strategy':8s} {'time ms':>8s} {'vs fp32':>7s} | " + " | ".join(
            f"s={s}: R med/max, grad med/max".ljust(34) for s in steps_list)
        print(head)
        for st in strategies:
            row = {"cpu_ms_median": round(med_t[st] * 1e3, 2), "cpu_ms_all": [round(x * 1e3, 2) for x in times[st]],
                   "emulated": st in EMULATED_ON_CPU, "by_steps": {}}
            cells = []
            for s in steps_list:
                e = errs[s][st]
                d = {"R_median": statistics.median(e["R"]), "R_max": max(e["R"]), "R_total": e["R_total"],
                     "grad_median": statistics.median(e["grad"]), "grad_max": max(e["grad"])}
                row["by_steps"][str(s)] = d
                cells.append(f"{d['R_median']:.1e}/{d['R_max']:.1e}, {d['grad_median']:.1e}/{d['grad_max']:.1e}"
                             .ljust(34))
            block["strategies"][st] = row
            speed = "emul." if st in EMULATED_ON_CPU else f"{med_t[st] * 1e3:8.1f}"
            ratio = "" if st in EMULATED_ON_CPU else f"{med_t[st] / med_t.get('fp32', med_t[st]):7.2f}"
            print(f"{st:8s} {speed:>8s} {ratio:>7s} | " + " | ".join(cells), flush=True)
        results["by_rank"][str(k_req)] = block

    if args.out:
        from rpsft.io import write_json

        write_json(args.out, results)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
