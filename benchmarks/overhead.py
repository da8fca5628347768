"""Step-time overhead of the rotation anchor over plain SFT (goal: RPSFT/SFT <= 1.02).

Setting: SmolLM2-135M-Instruct fp32 on this machine, the seven projections of all 30 layers anchored at k=128,
micro-batches of 4×256 tokens, gradient accumulation 4, AdamW with clipping — one optimizer step is 4 forward/
backward passes + clip + step, exactly what the Trainer does. Three variants, timed interleaved (A B C A B C ...)
so that machine noise hits all of them alike:

  sft        task loss only
  rpsft      + anchor.accumulate_grad_ once per optimizer step (our implementation)
  per-mb     + λ·R added to every micro-batch loss through autograd (the authors' way)

It also times the anchor call alone (median of several), so the overhead can be read as 1 + t_anchor / t_sft even
when the machine is noisy. Prints the ratios; writes JSON with --out.

    python benchmarks/overhead.py [--model smollm2-135m-instruct] [--rank 128] [--steps 3] [--out FILE]

``--frame-dtype bf16`` adds a fourth variant, ``rpsft-bf16``: the same closed-form anchor with lean frames
(rpsft.frames: bf16 U, V upcast per matrix, fp32 A_ref), timed interleaved with the others, and its anchor call
alone interleaved with the fp32-frame one. ``--variants sft,rpsft,rpsft-bf16`` drops the slow per-mb variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after 1 warm-up)")
    ap.add_argument("--anchor-reps", type=int, default=10)
    ap.add_argument("--frame-dtype", default=None, help="bf16 | fp16: add a lean-frame variant (rpsft-<dtype>)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants to time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from rpsft.anchor import RotationAnchor
    from rpsft.models import cache_root, load_model

    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model.train()
    t0 = time.perf_counter()
    anchor = RotationAnchor.from_model(model, rank=args.rank, cache_dir=cache_root() / "bases")
    bases_s = time.perf_counter() - t0
    anchors = {"rpsft": anchor}
    if args.frame_dtype:
        anchors[f"rpsft-{args.frame_dtype}"] = RotationAnchor.from_model(
            model, rank=args.rank, cache_dir=cache_root() / "bases", frame_dtype=args.frame_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.micro_batch, args.seq_len)) for _ in range(args.grad_accum)]

    def step(variant: str) -> float:
        t = time.perf_counter()
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss / args.grad_accum
            if variant == "per-mb":
                loss = loss + anchor.penalty(model) / args.grad_accum
            loss.backward()
        if variant in anchors:
            anchors[variant].accumulate_grad_(model, 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    variants = ["sft", "rpsft", "per-mb"] + [v for v in anchors if v != "rpsft"]
    if args.variants:
        variants = [v for v in variants if v in args.variants.split(",")]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up (allocator, first-touch of optimizer state)
        step(v)
    for _ in range(args.steps):
        for v in variants:
            times[v].append(step(v))

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    anchor_times: dict[str, list[float]] = {v: [] for v in anchors}
    for _ in range(args.anchor_reps):  # interleaved, like the steps
        for v, a in anchors.items():
            t = time.perf_counter()
            a.accumulate_grad_(model, 1.0)
            anchor_times[v].append(time.perf_counter() - t)

    med = {v: statistics.median(ts) for v, ts in times.items()}
    t_anchor = statistics.median(anchor_times["rpsft"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "model": args.model, "rank": args.rank, "matrices": len(anchor),
        "tokens_per_step": args.micro_batch * args.seq_len * args.grad_accum, "grad_accum": args.grad_accum,
        "threads": torch.get_num_threads(), "bases_seconds": round(bases_s, 2),
        "step_seconds_median": {k: round(v, 3) for k, v in med.items()},
        "step_seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "anchor_call_seconds_median": round(t_anchor, 4),
        "ratio_rpsft_over_sft": round(med["rpsft"] / med["sft"], 4) if "rpsft" in med else None,
        "ratio_per_microbatch_over_sft": round(med["per-mb"] / med["sft"], 4) if "per-mb" in med else None,
        "ratio_from_anchor_time": round(1 + t_anchor / med["sft"], 4),
        "anchor_nbytes": anchor.nbytes, "param_bytes": param_bytes,
        "anchor_over_param_bytes": round(anchor.nbytes / param_bytes, 4),
        "anchor_call_seconds_all": {v: [round(x, 4) for x in ts] for v, ts in anchor_times.items()},
        "anchor_call_seconds_median_by_variant": {v: round(statistics.median(ts), 4) for v, ts in anchor_times.items()},
        "anchor_nbytes_by_variant": {v: a.nbytes for v, a in anchors.items()},
    }
    print(f"SmolLM2 fp32, k={args.rank} on {len(anchor)} matrices, {args.grad_accum}×{args.micro_batch}×"
          f"{args.seq_len} tokens/step, {torch.get_num_threads()} threads")
    for v in variants:
        print(f"  {v:7s} step {med[v]:7.2f} s   ({', '.join(f'{x:.2f}' for x in times[v])})")
    for v, ts in anchor_times.items():
        print(f"  {v}: accumulate_grad_ alone {statistics.median(ts) * 1e3:.1f} ms "
              f"({', '.join(f'{x * 1e3:.0f}' for x in ts)}), anchor {anchors[v].nbytes / 2**20:.1f} MiB")
    for v in variants:
        if v != "sft" and "sft" in med:
            print(f"ratio {v}/SFT (end to end): {med[v] / med['sft']:.4f}")
    print(f"ratio RPSFT/SFT (1 + anchor/step) : {result['ratio_from_anchor_time']:.4f}   goal <= 1.02")
    print(f"anchor bytes {anchor.nbytes / 2**20:.1f} MiB vs parameters {param_bytes / 2**20:.1f} MiB "
          f"= {result['anchor_over_param_bytes']:.3f}")
    if args.out:
        from rpsft.fileio import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
