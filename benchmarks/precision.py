"""Precision of the anchor residual A = U_kᵀWV_k − diag σ_k and of ∇R = 2·U_k A V_kᵀ at realistic drift.

Setting: real SmolLM2-135M-Instruct matrices (the seven projections of a few layers; the embedded checkpoint,
de-quantised from the Q4_1 GGUF, not the original bf16 weights: docs/eval.md), bases from
``rpsft.bases.compute_bases`` (exact SVD, fp32 U/V, Rayleigh-refined σ — exactly what the anchor stores). The weight
is moved as a few AdamW steps at lr 1e-6 would move it: each step changes every entry by lr·(0.5·g + 0.5·ξ_t) with a
fixed sign pattern g = ±1 (Adam's m/√v is ≈ ±1 on a persistent gradient) and fresh noise ξ_t ∈ [−1, 1], so after s
steps |ΔW| ≈ 1e-6·(0.5·s + 0.5·√s) — 1e-6 … 5e-5 for s = 1 … 100 — and W = W0 + ΔW is rounded to fp32 as a
master weight would be. For every strategy of ``precision_strategies.py`` it reports, against the fp64 computation on the
same fp32 U, σ, V, W: the relative error of R = ‖A‖² and of ∇R (Frobenius), median and worst over matrices, and the
CPU time of one (R, ∇R) pass over all the matrices (median of interleaved repetitions; tf32 rows are emulated for
accuracy only — their speed needs a CUDA tensor core).

    python benchmarks/precision.py [--layers 0,15,29] [--rank 128,384] [--steps 0,1,10,100] [--out FILE]

``--frames bf16,fp16`` measures lean frames instead (``anchor.frame_dtype``, rpsft.frames) on the same matrices and
drift: the penalty at W0 relative to Σσ² (through the anchor's own residual), the gradient's relative error against
the fp32-frame penalty ‖U_kᵀ(W − W0)V_k‖² evaluated exactly in fp64 (once with the lean frames in fp64: the frame's
own effect; once as the anchor computes it: fp32, TF32 off, stored A_ref — next to the fp32-frame anchor computed
the same way), the largest principal angle between the rounded and the exact frame, and ‖U_lᵀU_l − I‖₂:

    python benchmarks/precision.py --frames bf16,fp16 --layers 0,29 --rank 128 --steps 1,10,100
"""

from __future__ import annotations

import argparse
import collections
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
    ap.add_argument("--frames", default=None, help="comma-separated lean frame dtypes (bf16,fp16): frame study")
    ap.add_argument("--targets", default=None, help="frame study: comma-separated projection names (default: all 7)")
    args = ap.parse_args()
    if args.frames:
        return frames_study(args)

    from rpsft.bases import compute_bases
    from rpsft.models import load_model
    from precision_strategies import EMULATED_ON_CPU, penalty_and_grad, strategy_fn  # beside this script
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
        from rpsft.fileio import write_json

        write_json(args.out, results)
        print(f"\nwrote {args.out}")


def _max_angle(Q: torch.Tensor, R: torch.Tensor) -> float:
    """Largest principal angle (radians) between span(Q) and span(R), via an orthonormalised Q in fp64."""
    Qo, _ = torch.linalg.qr(Q.double())
    Ro, _ = torch.linalg.qr(R.double())
    # sin of the largest angle = ‖(I − R Rᵀ) Qo‖₂: accurate for the tiny angles here (arccos of ~1 is not)
    return float(torch.asin(torch.linalg.matrix_norm(Qo - Ro @ (Ro.T @ Qo), ord=2).clamp(max=1.0)))


def frames_study(args) -> None:
    from rpsft.anchor import RotationAnchor, _Term
    from rpsft.bases import compute_bases
    from rpsft.frames import lean_bases, parse_frame_dtype, reference_block
    from rpsft.models import load_model
    from rpsft.precision import ieee_fp32
    from rpsft.selection import select_matrices

    layers = [int(x) for x in args.layers.split(",")]
    k_req = int(args.rank.split(",")[0])
    steps_list = [int(x) for x in args.steps.split(",") if int(x) > 0]
    fds = [x.strip() for x in args.frames.split(",") if x.strip()]
    model, _ = load_model(args.model)
    targets = args.targets.split(",") if args.targets else None
    mats = [(n, p.detach().float().clone()) for n, p in select_matrices(model, targets, layers)]
    del model
    gen = torch.Generator().manual_seed(0)

    def term(name, W0, U, S, V, Aref=None):
        return _Term(name, tuple(W0.shape), U.shape[1], U=U, S=S, V=V, ref_sq=float(S.double().pow(2).sum()),
                     Aref=Aref)

    def run(t, W, dtype=torch.float32):
        """(R, ∇R) of one term through RotationAnchor's own residual and closed-form gradient."""
        a = RotationAnchor([t], dtype=dtype)
        with torch.no_grad(), ieee_fp32():
            A = a._residual(t, W)
            U, V = t.frames(dtype)
            return float(A.double().pow(2).sum()), 2.0 * (U @ A) @ V.T

    rows = {}
    for name, W0 in mats:
        k = min(k_req, min(W0.shape))
        if k >= min(W0.shape):
            continue
        b = compute_bases(W0, k)
        sig2 = float(b.S.double().pow(2).sum())
        fp32 = term(name, W0, b.U, b.S, b.V)
        Wd = {s: drifted(W0, s, args.lr, gen) for s in steps_list}

        def exact(U, V, s):
            """∇‖Uᵀ(W − W0)V‖² in fp64 with W − W0 formed exactly: the penalty of these frames, no stored σ/A_ref."""
            U64, V64 = U.double(), V.double()
            return 2.0 * (U64 @ (U64.T @ (Wd[s].double() - W0.double()) @ V64)) @ V64.T

        def rel(G, s, ref):
            return float((G.double() - ref[s]).norm() / ref[s].norm())

        ref = {s: exact(b.U, b.V, s) for s in steps_list}  # the fp32-frame anchor's penalty, exactly
        full = lean_bases(W0, b, torch.float32)  # fp32 frames with their A_ref (fp16 off-diagonal): "unified"
        row = {"k": k, "shape": list(W0.shape), "sigma_sq": sig2,
               "R0": {"fp32": run(fp32, W0)[0], "fp32+Aref": run(term(name, W0, b.U, full.S, b.V, full.A), W0)[0]},
               "grad_fp32_frames_fp32": {s: rel(run(fp32, Wd[s])[1], s, ref) for s in steps_list},
               "grad_fp32_frames_Aref_fp32": {s: rel(run(term(name, W0, b.U, full.S, b.V, full.A), Wd[s])[1], s, ref)
                                              for s in steps_list}}
        for fd in fds:
            dt = parse_frame_dtype(fd)
            lb = lean_bases(W0, b, dt)
            lean = term(name, W0, lb.U, lb.S, lb.V, lb.A)
            naive = term(name, W0, lb.U, b.S, lb.V)  # rounded frames against diag σ_k: plain low-precision bases
            A32 = reference_block(W0, lb.U, lb.V)  # the whole A_ref in fp32: the costlier storage, for comparison
            off32 = A32 - torch.diag_embed(torch.diagonal(A32))
            whole = term(name, W0, lb.U, lb.S, lb.V, off32)
            bf = term(name, W0, lb.U, lb.S, lb.V, off32.bfloat16())  # the off-diagonal in bf16 instead of fp16
            row[fd] = {
                "R0": run(lean, W0)[0], "R0_naive": run(naive, W0)[0], "R0_Aref_fp32": run(whole, W0)[0],
                "R0_offdiag_bf16": run(bf, W0)[0],
                "offdiag_dtype": str(lb.A.dtype).replace("torch.", ""),
                "angle_U": _max_angle(lb.U, b.U), "angle_V": _max_angle(lb.V, b.V),
                "orth_U": float(torch.linalg.matrix_norm(
                    lb.U.double().T @ lb.U.double() - torch.eye(k, dtype=torch.float64), ord=2)),
                "grad_fp64": {s: rel(exact(lb.U, lb.V, s), s, ref) for s in steps_list},  # the frame's own effect
                "grad_fp32": {s: rel(run(lean, Wd[s])[1], s, ref) for s in steps_list},  # as the anchor computes
                "grad_fp32_Aref_fp32": {s: rel(run(whole, Wd[s])[1], s, ref) for s in steps_list},
            }
        rows[name] = row
        print(f"{name}: k={k} " + " ".join(
            f"{fd}: R0/Σσ² {row[fd]['R0'] / sig2:.1e} (naive {row[fd]['R0_naive'] / sig2:.1e}) "
            f"angle {max(row[fd]['angle_U'], row[fd]['angle_V']):.1e} grad64 "
            + "/".join(f"{row[fd]['grad_fp64'][s]:.1e}" for s in steps_list) for fd in fds), flush=True)

    def med_max(vals):
        return f"{statistics.median(vals):.1e} ({max(vals):.0e})"

    R = list(rows.values())
    tot = sum(r["sigma_sq"] for r in R)
    print(f"\n{len(R)} matrices (layers {layers}), k={k_req}, lr {args.lr:g}; per matrix median (worst)")
    print(f"fp32 frames: R(W0)/Σσ² {med_max([r['R0']['fp32'] / r['sigma_sq'] for r in R])}; "
          f"with A_ref {med_max([r['R0']['fp32+Aref'] / r['sigma_sq'] for r in R])}; grad err (fp32 compute) "
          + ", ".join(f"s={s}: {med_max([r['grad_fp32_frames_fp32'][s] for r in R])}" for s in steps_list)
          + "; with A_ref " + ", ".join(f"s={s}: {med_max([r['grad_fp32_frames_Aref_fp32'][s] for r in R])}"
                                        for s in steps_list))
    summary = {"sum_sigma_sq": tot, "fp32_R0_total": sum(r["R0"]["fp32"] for r in R),
               "fp32_Aref_R0_total": sum(r["R0"]["fp32+Aref"] for r in R)}
    for fd in fds:
        print(f"{fd} frames: R(W0)/Σσ² {med_max([r[fd]['R0'] / r['sigma_sq'] for r in R])}; naive diag σ "
              f"{med_max([r[fd]['R0_naive'] / r['sigma_sq'] for r in R])}; whole A_ref in fp32 "
              f"{med_max([r[fd]['R0_Aref_fp32'] / r['sigma_sq'] for r in R])}; off-diagonal in bf16 "
              f"{med_max([r[fd]['R0_offdiag_bf16'] / r['sigma_sq'] for r in R])}; off-diagonal stored "
              f"{sorted(collections.Counter(r[fd]['offdiag_dtype'] for r in R).items())}; max angle U "
              f"{med_max([r[fd]['angle_U'] for r in R])}, V {med_max([r[fd]['angle_V'] for r in R])}; "
              f"‖UᵀU−I‖₂ {med_max([r[fd]['orth_U'] for r in R])}")
        print("   grad err vs the fp32-frame penalty ‖U_kᵀ(W−W0)V_k‖² in fp64: frames alone (fp64) "
              + ", ".join(f"s={s}: {med_max([r[fd]['grad_fp64'][s] for r in R])}" for s in steps_list)
              + "; as computed (fp32) " + ", ".join(f"s={s}: {med_max([r[fd]['grad_fp32'][s] for r in R])}"
                                                     for s in steps_list)
              + "; whole A_ref in fp32 " + ", ".join(
                  f"s={s}: {med_max([r[fd]['grad_fp32_Aref_fp32'][s] for r in R])}" for s in steps_list))
        summary[fd] = {"R0_total": sum(r[fd]["R0"] for r in R), "R0_naive_total": sum(r[fd]["R0_naive"] for r in R)}
        print(f"   totals: R(W0) {summary[fd]['R0_total']:.2e} vs Σσ² {tot:.3e} -> "
              f"{summary[fd]['R0_total'] / tot:.1e} (goal <= 1e-6); naive {summary[fd]['R0_naive_total']:.2e}")
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, {"model": args.model, "layers": layers, "k": k_req, "lr": args.lr,
                              "summary": summary, "matrices": rows})
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
