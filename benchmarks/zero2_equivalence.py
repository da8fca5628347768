"""DeepSpeed ZeRO-2 gives the same RPSFT run as plain PyTorch: a check, not a timing.

Under DeepSpeed the gradient buffers belong to DeepSpeed, so the closed-form anchor cannot add 2λ·U_k A V_kᵀ to
``.grad``; ``anchor.mode=auto`` switches to the autograd form (λ·R added to the loss of the last micro-batch of
each accumulation window, one penalty per optimizer step — Eq. 4's objective, same gradient). This script trains a
tiny random-init Llama for a few SGD steps three ways and prints the largest relative weight difference:

* plain   — ``rpsft train`` in one process (closed form);
* zero2   — the same config under ``accelerate launch`` with DeepSpeed ZeRO-2 (autograd form);
* sft     — plain SFT, to show the anchor changed the trajectory (so zero2 == plain is not SFT == SFT).

    pip install deepspeed            # not a dependency of rpsft; on CPU it runs with DS_ACCELERATOR=cpu
    python benchmarks/zero2_equivalence.py [--processes 1] [--out DIR]

SGD with a constant lr: the update is linear in the gradient, so weight differences measure gradient differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_inputs(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from rpsft_testing import make_tiny_llama, make_tokenizer

    from rpsft.data.synthetic_math import generate

    tok = make_tokenizer()
    make_tiny_llama(len(tok), tokenizer=tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for r in generate(64, seed=1):
            f.write(json.dumps(r) + "\n")
    cfg = root / "cfg.yaml"
    cfg.write_text(f"model: {{name: {root / 'model'}}}\ndata: {{train: {root / 'train.jsonl'}, limit: 32, "
                   "max_length: 96}\nanchor: {rank: 4, lam: 100}\ntrain: {max_steps: 3, batch_size: 2, grad_accum: 2, "
                   "lr: 0.05, optim: sgd, lr_scheduler: constant, warmup_ratio: 0.0, max_grad_norm: 0, "
                   "save_steps: 100}\n")
    return cfg


def _accelerate_config(root: Path, processes: int) -> Path:
    path = root / "zero2.yaml"
    path.write_text(f"""compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
mixed_precision: 'no'
num_machines: 1
num_processes: {processes}
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: true
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
  gradient_accumulation_steps: auto
  gradient_clipping: auto
  zero3_init_flag: false
""")
    return path


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(run_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / (b[n].norm() + 1e-12)) for n in b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=1, help="DeepSpeed processes (1: same batches as plain)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        sys.exit("this check needs DeepSpeed: pip install deepspeed")
    root = Path(args.out or tempfile.mkdtemp(prefix="rpsft-zero2-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = _write_inputs(root)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    rpsft = [sys.executable, "-m", "rpsft.cli", "train", "--config", str(cfg), "--overwrite"]
    runs = {
        "plain": rpsft + ["--set", f"output_dir={root / 'plain'}"],
        "sft": rpsft + ["--set", f"output_dir={root / 'sft'}", "--set", "method=sft"],
        "zero2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(_accelerate_config(root, args.processes)), "-m", "rpsft.cli", "train", "--config", str(cfg),
                  "--overwrite", "--set", f"output_dir={root / 'zero2'}"],
    }
    for name, cmd in runs.items():
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{name} run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    w = {name: _weights(root / name) for name in runs}
    zero2_vs_plain, plain_vs_sft = _max_rel(w["zero2"], w["plain"]), _max_rel(w["plain"], w["sft"])
    print(f"DeepSpeed ZeRO-2 ({args.processes} process(es)) vs plain closed form, 3 SGD steps, λ=100, k=4: "
          f"max relative weight difference {zero2_vs_plain:.2e}")
    print(f"plain RPSFT vs plain SFT (the anchor's effect): {plain_vs_sft:.2e}; "
          f"ratio {plain_vs_sft / max(zero2_vs_plain, 1e-30):.1e}")
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
