"""Anchor memory vs the formula (goal: ≤ (m + n)·k·bytes + O(k) per matrix, no W0 copy for low-rank ones).

Builds ``RotationAnchor.from_model`` at each k and compares ``anchor.nbytes`` with Σ (m + n + 1)·k·4 over low-rank
matrices + Σ m·n·4 over those that keep W0 (square matrices at full rank), and checks that no term with bases
holds a W0 tensor. Bases come from
the cache (``<cache root>/bases``) when present, so a second run is fast.

    python benchmarks/memory.py [--model smollm2-135m-instruct] [--rank 128,384] [--frame-dtype bf16] [--out FILE]

``--frame-dtype bf16|fp16`` builds lean frames (rpsft.frames) instead; their formula is (m + n)·k·2 + k·4 + k²·2
bytes per low-rank matrix (σ_k fp32, A_ref's off-diagonal fp16), and the fp32-frame formula is printed beside it for
the ratio.
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", default="128,384")
    ap.add_argument("--frame-dtype", default="fp32", help="fp32 | bf16 | fp16 (anchor.frame_dtype)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rpsft.anchor import RotationAnchor
    from rpsft.frames import anchor_nbytes, parse_frame_dtype
    from rpsft.models import cache_root, load_model

    model, _ = load_model(args.model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for k in [int(x) for x in args.rank.split(",")]:
        anchor = RotationAnchor.from_model(model, rank=k, cache_dir=cache_root() / "bases",
                                           frame_dtype=args.frame_dtype)
        frame = parse_frame_dtype(args.frame_dtype)
        low = [t for t in anchor.terms.values() if not t.full]
        full = [t for t in anchor.terms.values() if t.full]
        expected = sum(anchor_nbytes([t.shape], t.k, frame) for t in low) + sum(
            t.shape[0] * t.shape[1] * 4 for t in full)
        fp32_bytes = sum(anchor_nbytes([t.shape], t.k) for t in low) + sum(t.shape[0] * t.shape[1] * 4 for t in full)
        w0_in_low = sum(t.W0 is not None for t in low)
        row = {"k": k, "matrices": len(anchor), "low_rank": len(low), "full_rank": len(full),
               "nbytes": anchor.nbytes, "formula_bytes": expected, "w0_copies_in_low_rank": w0_in_low,
               "param_bytes": params, "frame_dtype": args.frame_dtype, "fp32_frames_bytes": fp32_bytes,
               "ratio_to_fp32_frames": anchor.nbytes / fp32_bytes, "ok": anchor.nbytes == expected and w0_in_low == 0}
        rows.append(row)
        print(f"k={k}: {len(low)} low-rank + {len(full)} full-rank matrices; anchor {anchor.nbytes / 2**20:.2f} MiB, "
              f"formula {expected / 2**20:.2f} MiB, params {params / 2**20:.1f} MiB; W0 copies in low-rank terms: "
              f"{w0_in_low} -> {'OK' if row['ok'] else 'MISMATCH'}; frames {args.frame_dtype}: "
              f"{row['ratio_to_fp32_frames']:.3f} × fp32 frames ({fp32_bytes / 2**20:.2f} MiB)")
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, {"model": args.model, "rows": rows})
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
