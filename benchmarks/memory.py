"""Anchor memory vs the formula (goal: ≤ (m + n)·k·bytes + O(k) per matrix, no W0 copy for low-rank ones).

Builds ``RotationAnchor.from_model`` at each k and compares ``anchor.nbytes`` with Σ (m + n + 1)·k·4 over low-rank
matrices + Σ m·n·4 over those that keep W0 (at k = min(m, n): the paper's rule), and checks that no term with bases
holds a W0 tensor. Bases come from
the cache (``<cache root>/bases``) when present, so a second run is fast.

    python benchmarks/memory.py [--model smollm2-135m-instruct] [--rank 128,384] [--frame-dtype bf16] [--out FILE]

``--frame-dtype bf16|fp16`` builds lean frames (rpsft.frames) instead; their formula is (m + n)·k·2 + k·4 + k²·2
bytes per low-rank matrix (σ_k fp32, A_ref's off-diagonal fp16), and the fp32-frame formula is printed beside it for
the ratio.

``--peak`` instead compares the memory plan (rpsft.plan, what ``rpsft plan`` prints) with the measured peak of real
training steps on this CPU, one child process per setting:

    python benchmarks/memory.py --peak [--settings sft:1x512,rpsft:2x256,sft:4x512+gc] [--steps 3] [--out FILE]

Each setting is METHOD:BATCHxSEQ (rpsft at anchor.rank=128; a ``+gc`` suffix turns gradient checkpointing on), one
process, fp32, on rows longer than SEQ tokens (every micro-batch is BATCH × SEQ). Measured: the child's peak resident
set (VmHWM, reset when training begins) minus its resident set at that moment, plus the weights and anchor it already
held then (their bytes are counted exactly, not estimated; the weights are first copied out of the safetensors file
mapping, of which only touched pages are resident). The peak is read at the last optimizer step, before the
Trainer's final checkpoint save (a copy to host memory on a GPU, outside the device plan). glibc is told to give every
block of 64 KiB or more back to the system when freed (MALLOC_MMAP_THRESHOLD_=65536), so the resident set follows the
bytes in use rather than the allocator's retained free blocks. Goal: the plan within 15 % of the measurement.
"""

from __future__ import annotations

import argparse


PEAK_RANK = 128  # anchor.rank of the rpsft settings of --peak


def _status_kib(field: str) -> int:
    import re

    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def _peak_config(method: str, batch: int, seq: int, steps: int, model: str, data: str, out: str,
                 checkpointing: bool = False):
    from rpsft.config import Config

    cfg = Config()
    cfg.method, cfg.output_dir = method, out
    cfg.model.name = model
    cfg.data.train, cfg.data.max_length = data, seq
    cfg.anchor.rank = PEAK_RANK
    t = cfg.train
    t.batch_size, t.grad_accum, t.max_steps, t.save_steps, t.logging_steps = batch, 1, steps, 10**6, 1
    t.bf16, t.gradient_checkpointing = False, checkpointing
    return cfg


def _long_rows(path: str, seq: int, n: int = 64) -> None:
    """Rows well over ``seq`` tokens (truncated to it), so that every micro-batch is batch × seq tokens."""
    from rpsft.data.synthetic_math import generate
    from rpsft.fileio import write_jsonl

    probs = generate(8 * n, seed=0)
    rows = []
    for i in range(n):
        text = " ".join(r["completion"][0]["content"] for r in probs[8 * i:8 * i + 8])
        rows.append({"prompt": probs[8 * i]["prompt"], "completion": [{"role": "assistant",
                                                                        "content": (text + " ") * (1 + seq // 200)}]})
    write_jsonl(path, rows)


def _child(method: str, batch: int, seq: int, steps: int, model: str, out_json: str, ckpt: bool) -> None:
    """One measured run: VmHWM reset when training begins, read when it ends."""
    import ctypes
    import gc
    import tempfile

    from transformers import TrainerCallback

    from rpsft.fileio import write_json
    from rpsft.train import train

    held = {}

    class PeakMeter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            params = list({id(p): p for p in model.parameters()}.values())
            for p in params:  # weights loaded from safetensors are mapped from the file and only partly resident:
                p.data = p.data.clone()  # make them ordinary memory, so that the baseline holds all of them
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            held["weights"] = sum(p.numel() * p.element_size() for p in params)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            held["rss0"] = _status_kib("VmRSS")

        def on_step_end(self, args, state, control, **kwargs):
            # the last optimizer step, before the Trainer's final checkpoint save (a copy to host memory on a GPU,
            # which the device plan does not count)
            held["hwm"] = _status_kib("VmHWM")
            held.setdefault("hwm_steps", []).append(held["hwm"])

        def on_train_end(self, args, state, control, **kwargs):
            held["hwm_with_save"] = _status_kib("VmHWM")

    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/rows.jsonl"
        _long_rows(data, seq)
        cfg = _peak_config(method, batch, seq, steps, model, data, f"{tmp}/run", ckpt)
        summary = train(cfg, extra_callbacks=[PeakMeter()], progress=False)
    anchor = (summary.get("anchor") or {}).get("nbytes", 0)
    write_json(out_json, {**held, "anchor": anchor, "measured": held["hwm"] - held["rss0"] + held["weights"] + anchor})


def measure_peak(method: str, batch: int, seq: int, steps: int, model: str, ckpt: bool = False) -> dict:
    """The measured run of one setting, in a child process (see the module docstring)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        subprocess.run([sys.executable, __file__, "--child", method, str(batch), str(seq), str(steps), str(model),
                        f"{tmp}/m.json", str(int(ckpt))], check=True, env=env)
        return json.loads(open(f"{tmp}/m.json").read())


def plan_peak(method: str, batch: int, seq: int, steps: int, model: str, ckpt: bool = False, shape=None):
    """The memory plan of the same setting, for one process on this CPU."""
    from rpsft.plan import Launcher, plan_memory

    return plan_memory(_peak_config(method, batch, seq, steps, str(model), "unused.jsonl", "unused", ckpt),
                       Launcher(cpu=True), shape=shape)


def peak_main(args) -> None:
    from rpsft.fileio import write_json
    from rpsft.plan import model_shape

    shape = model_shape(args.model)
    rows = []
    for setting in args.settings.split(","):
        method, size = setting.split(":")
        ckpt = size.endswith("+gc")
        batch, seq = (int(x) for x in size.removesuffix("+gc").lower().split("x"))
        plan = plan_peak(method, batch, seq, args.steps, args.model, ckpt, shape)
        m = measure_peak(method, batch, seq, args.steps, args.model, ckpt)
        row = {"setting": setting, "plan_peak": plan.peak, "plan_forward": plan.forward_peak,
               "plan_step": plan.step_peak, "plan_rows": {r.name: r.bytes for r in plan.rows}, **m,
               "ratio": plan.peak / m["measured"]}
        row["ok"] = abs(row["ratio"] - 1) <= 0.15
        rows.append(row)
        print(f"{setting:14s} plan {plan.peak / 2**30:6.3f} GiB (fwd/bwd {plan.forward_peak / 2**30:.3f}, step "
              f"{plan.step_peak / 2**30:.3f})  measured {m['measured'] / 2**30:6.3f} GiB  plan/measured "
              f"{row['ratio']:.3f} -> {'OK' if row['ok'] else 'OFF BY MORE THAN 15 %'}", flush=True)
    if args.out:
        write_json(args.out, {"model": args.model, "steps": args.steps, "rows": rows})
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, batch, seq, steps, model, out, ckpt = sys.argv[2:9]
        return _child(method, int(batch), int(seq), int(steps), model, out, ckpt == "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", default="128,384")
    ap.add_argument("--frame-dtype", default="fp32", help="fp32 | bf16 | fp16 (anchor.frame_dtype)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--peak", action="store_true", help="the memory plan against the measured peak of training")
    ap.add_argument("--settings", default="sft:1x512,rpsft:2x256,sft:4x512+gc",
                    help="--peak: METHOD:BATCHxSEQ[+gc] (+gc: gradient checkpointing), comma-separated")
    ap.add_argument("--steps", type=int, default=3, help="--peak: optimizer steps per measured run")
    args = ap.parse_args()
    if args.peak:
        return peak_main(args)

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
