"""Bases precompute: exact SVD vs Gram-eigh vs randomized SVD on every projection matrix of a model.

For each selected matrix (default: the seven projections of every layer of SmolLM2 — 210 matrices;
the embedded checkpoint, de-quantised from the Q4_1 GGUF: docs/eval.md) and each k
(default 128 and 384, clipped to min(m, n); a k equal to min(m, n) cuts no spectrum, so it is skipped here —
with anchor.full_rank=eq3 training still computes and caches those bases for non-square matrices):

* wall time of ``rpsft.bases.solve_bases`` (compute_bases without its niter guard) with solver exact, gram and randomized at niter 2, 4, 8, 16
  (solvers interleaved per matrix, in a rotating order, so a noisy machine slows all of them alike);
* top-k subspace overlap with the exact bases, ``rpsft.bases.subspace_overlap`` (1 = same subspace), for U and V;
* the spectral gap σ_k/σ_{k+1} of the exact spectrum, and the max |σ_i − σ_i^exact|/σ_1 of the refined σ.

exact and gram compute the whole spectrum once per matrix whatever k, so they are timed once and their time is
charged to every k. Prints a summary (total time per solver, min / median overlap, gap statistics) and writes
every per-matrix number as JSON with --out.

    python benchmarks/precompute.py [--rank 128,384] [--niter 2,4,8,16] [--layers 0-29] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def gaps_only(mats, ranks: list[int], out: str | None) -> None:
    """σ_k/σ_(k+1) for every matrix at every k < min(m, n): how flat the spectrum is where the top-k frame is cut."""
    gaps: dict[int, list[tuple[str, float]]] = {k: [] for k in ranks}
    for name, W in mats:
        S = torch.linalg.svdvals(W).double()
        for k in ranks:
            if k < min(W.shape):
                gaps[k].append((name, float(S[k - 1] / S[k])))
    res = {}
    for k, g in gaps.items():
        v = sorted(x for _, x in g)
        if not v:
            continue
        res[str(k)] = {"matrices": len(v), "min": v[0], "median": statistics.median(v), "max": v[-1],
                       "below_1.01": sum(x < 1.01 for x in v), "per_matrix": dict(g)}
        print(f"k={k}: {len(v)} matrices with k < min(m, n); σ_k/σ_(k+1) min {v[0]:.4f}, median "
              f"{statistics.median(v):.4f}, max {v[-1]:.4f}; {res[str(k)]['below_1.01']} below 1.01")
    if out:
        from rpsft.fileio import write_json

        write_json(out, {"gaps": res})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", default="128,384")
    ap.add_argument("--niter", default="2,4,8,16")
    ap.add_argument("--layers", default=None, help="e.g. 0-29 or 0,15 (default: all)")
    ap.add_argument("--gaps-only", action="store_true", help="only σ_k/σ_(k+1) of every matrix (singular values)")
    ap.add_argument("--no-randomized", action="store_true", help="only exact and gram (fast pass over all matrices)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rpsft.bases import solve_bases, subspace_overlap
    from rpsft.models import load_model
    from rpsft.selection import select_matrices

    ranks = [int(x) for x in args.rank.split(",")]
    niters = [] if args.no_randomized else [int(x) for x in args.niter.split(",")]
    model, _ = load_model(args.model)
    mats = [(n, p.detach().float().clone()) for n, p in select_matrices(model, None, args.layers)]
    del model
    print(f"{args.model}: {len(mats)} matrices, k {ranks}, randomized niter {niters}, "
          f"{torch.get_num_threads()} threads", flush=True)

    if args.gaps_only:
        return gaps_only(mats, ranks, args.out)
    rows = []
    t_start = time.perf_counter()
    for idx, (name, W) in enumerate(mats):
        m, n = W.shape
        ks = [min(k, min(m, n)) for k in ranks]
        kmax = max([k for k in ks if k < min(m, n)], default=0)
        row = {"name": name, "shape": [m, n], "time": {}, "cpu": {}, "by_k": {}}
        if kmax == 0:
            rows.append(row)
            continue
        jobs = [("exact", None, kmax), ("gram", None, kmax)] + [(f"randomized{q}", q, k) for q in niters
                                                                 for k in sorted(set(ks)) if k < min(m, n)]
        shift = idx % len(jobs)  # rotate the order: no solver always runs first (cold caches) or last
        jobs = jobs[shift:] + jobs[:shift]
        out = {}
        for label, q, k in jobs:
            t, c = time.perf_counter(), time.process_time()
            # solve_bases: the solver without compute_bases' guard, which refuses niter < 4 (measured here)
            b = solve_bases(W, k, solver=label) if q is None else solve_bases(W, k, solver="randomized", niter=q)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            key = label if q is None else f"{label}@{k}"
            out[key] = b
            row["time"][key] = dt
            row["cpu"][key] = dc  # CPU seconds of all threads: less sensitive than wall time to a busy machine
        S_all = torch.linalg.svdvals(W).double()  # fp32 resolves gaps of 1e-4 (ulp 6e-8); only for σ_k/σ_(k+1)
        ex = out["exact"]
        for k in sorted(set(ks)):
            if k >= min(m, n):
                continue
            d = {"gap": float(S_all[k - 1] / S_all[k]), "sigma_k": float(S_all[k - 1]),
                 "sigma_1": float(S_all[0]), "overlap": {}, "sigma_err": {}}
            ref = ex.prefix(k)
            cands = {"gram": out["gram"].prefix(k)}
            cands.update({f"randomized{q}": out[f"randomized{q}@{k}"] for q in niters})
            for label, b in cands.items():
                d["overlap"][label] = min(subspace_overlap(ref.U, b.U), subspace_overlap(ref.V, b.V))
                d["sigma_err"][label] = float((b.S.double() - ref.S.double()).abs().max() / S_all[0])
            d["overlap"]["exact"] = 1.0
            row["by_k"][str(k)] = d
        rows.append(row)
        if (idx + 1) % 21 == 0:
            print(f"  {idx + 1}/{len(mats)} matrices, {time.perf_counter() - t_start:.0f} s", flush=True)

    solvers = ["exact", "gram"] + [f"randomized{q}" for q in niters]
    summary = {"model": args.model, "matrices": len(mats), "threads": torch.get_num_threads(), "by_k": {}}
    print(f"\nbases precompute, {len(mats)} matrices (wall {time.perf_counter() - t_start:.0f} s)")
    for k in ranks:
        kk = str(k)
        sub = [(r, r["by_k"].get(str(min(k, min(r["shape"]))))) for r in rows]
        sub = [(r, d) for r, d in sub if d is not None]
        if not sub:
            continue
        blk = {"matrices": len(sub), "skipped_full_rank": len(rows) - len(sub), "solvers": {}}
        gaps = [d["gap"] for _, d in sub]
        blk["gap"] = {"min": min(gaps), "median": statistics.median(gaps), "max": max(gaps)}
        print(f"\nk={k} (clipped): {len(sub)} matrices with bases, {blk['skipped_full_rank']} at full rank (not measured "
              f"here); σ_k/σ_(k+1): min {min(gaps):.4f}, median {statistics.median(gaps):.4f}, "
              f"max {max(gaps):.4f}")
        print(f"  {'solver':13s} {'wall s':>8s} {'CPU s':>8s} {'min overlap':>12s} {'median':>8s} {'#<0.99':>7s} "
              f"{'max σ err/σ1':>13s}")
        for s in solvers:
            key = (lambda r, d: s) if s in ("exact", "gram") else (lambda r, d: f"{s}@{min(k, min(r['shape']))}")
            total = sum(r["time"][key(r, d)] for r, d in sub)
            cpu = sum(r["cpu"][key(r, d)] for r, d in sub)
            ov = [d["overlap"][s] for _, d in sub]
            se = [d["sigma_err"].get(s, 0.0) for _, d in sub]
            blk["solvers"][s] = {"total_seconds": round(total, 2), "cpu_seconds": round(cpu, 2), "overlap_min": min(ov),
                                 "overlap_median": statistics.median(ov), "below_0.99": sum(o < 0.99 for o in ov),
                                 "sigma_err_max": max(se)}
            print(f"  {s:13s} {total:8.1f} {cpu:8.1f} {min(ov):12.4f} {statistics.median(ov):8.4f} "
                  f"{sum(o < 0.99 for o in ov):7d} {max(se):13.2e}")
        summary["by_k"][kk] = blk
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, {"summary": summary, "rows": rows})
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
