"""One-GPU readiness check of RPSFT at real shapes: one command, no network, a few minutes; prints one table.

    python benchmarks/gpu_check.py                    # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny  # the same code on tiny shapes (what the test suite runs)

Models are random-init from a transformers config at the published layouts (no download): Qwen2.5-1.5B for the
training rows, Qwen2.5-7B for the bases timing. Rows:

* bases (7B layout / 1.5B layout): seconds for ``RotationAnchor.from_model`` at k=768 (fp32, exact SVD) with the
  model on the GPU, the seven projections of every layer. Goal for 7B: <= 20 s. Random weights have flat spectra
  like SmolLM2's; the exact solver's time does not depend on the spectrum much.
* anchor memory: bytes the anchor holds on the device (measured allocator delta and the formula (m+n+1)·k·4).
* penalty at init: R right after building the anchor (fp32 round-off), and the largest per-matrix ‖A‖/‖σ_k‖.
* step ratio: RPSFT / SFT optimizer-step time, interleaved in one process (SFT, RPSFT, SFT, ...), each step
  ``grad_accum`` forward/backward passes of ``micro_batch`` × ``seq_len`` tokens with gradient checkpointing,
  + ``anchor.accumulate_grad_`` for RPSFT, + AdamW. Median of the pair ratios, with min-max. Goal <= 1.02 at
  16×4096 tokens per step.
* placement: a tiny model built on the CPU with its anchor, then moved to the GPU: the anchor follows it (penalty
  on the GPU, gradient equal to the CPU one).
* vllm greedy agreement (only with vLLM installed): ``rpsft eval --backend vllm`` against ``--backend hf`` on
  greedy decoding of synthetic math prompts with a small random Qwen2 saved to a temporary directory: identical
  completions and the mean agreed prefix. Random weights make near-ties common, so this checks the path and the
  numerics, not task quality.

Without CUDA (and without ``--device cpu``) it exits with one line saying so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# published layouts (config.json of the Qwen2.5 releases)
LAYOUTS = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}


def qwen2(layout: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A random-init Qwen2ForCausalLM at ``layout``, created directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{**LAYOUTS[layout], "max_position_embeddings": 32768, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_bases(layout: str, device, dtype, k: int, svd: str = "exact") -> dict:
    from rpsft.anchor import RotationAnchor

    model = qwen2(layout, device, dtype)
    sync(device)
    mem0 = allocated(device)
    t = time.perf_counter()
    anchor = RotationAnchor.from_model(model, rank=k, svd=svd)
    sync(device)
    seconds = time.perf_counter() - t
    out = {"seconds": seconds, "matrices": len(anchor), "nbytes": anchor.nbytes,
           "measured_bytes": allocated(device) - mem0, "anchor": anchor, "model": model}
    return out


@torch.no_grad()
def check_penalty_at_init(anchor, model) -> dict:
    R = float(anchor.penalty(model))
    drift = anchor.drift(model)
    return {"R": R, "max_rel": max((v["rel"] for v in drift.values()), default=0.0)}


def check_step_ratio(model, anchor, device, micro_batch: int, seq_len: int, grad_accum: int, pairs: int,
                     seed: int = 0) -> dict:
    """Interleaved SFT / RPSFT optimizer steps on the same model and batches; per-pair time ratios."""
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # as the paper recipes run (16×4096 tokens do not fit otherwise)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (micro_batch, seq_len), generator=g).to(device) for _ in range(grad_accum)]

    def step(anchored: bool) -> float:
        sync(device)
        t = time.perf_counter()
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / grad_accum).backward()
        if anchored:
            anchor.accumulate_grad_(model, 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t

    step(False), step(True)  # warm-up: kernels, allocator, the anchor's first use
    sft, rpsft = [], []
    for _ in range(pairs):
        sft.append(step(False))
        rpsft.append(step(True))
    ratios = [r / s for s, r in zip(sft, rpsft)]
    del opt
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "sft_s": statistics.median(sft), "rpsft_s": statistics.median(rpsft),
            "tokens": micro_batch * seq_len * grad_accum}


def check_placement(device) -> dict:
    """A tiny model and its anchor built on the CPU, then the model moved to ``device``: the anchor follows."""
    from rpsft.anchor import RotationAnchor

    model = qwen2("tiny", torch.device("cpu"), torch.float32, seed=1)
    anchor = RotationAnchor.from_model(model, rank={"down_proj": 1.0, "*": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    r_cpu = anchor.accumulate_grad_(model, 1.0)
    g_cpu = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.to(device)
    pen = anchor.penalty(model)
    model.zero_grad(set_to_none=True)
    r_dev = anchor.accumulate_grad_(model, 1.0)
    err = max(float((p.grad.cpu() - g_cpu[n]).norm() / g_cpu[n].norm().clamp_min(1e-30))
              for n, p in model.named_parameters() if n in g_cpu)
    return {"penalty_device": str(pen.device), "R_rel_diff": abs(r_dev - r_cpu) / max(r_cpu, 1e-30),
            "grad_rel_err": err, "terms_on": sorted({x.device.type for t in anchor.terms.values()
                                                     for x in t.tensors()})}


def check_vllm(n_prompts: int = 32, max_new_tokens: int = 32) -> dict:
    """Greedy completions of ``rpsft eval --backend vllm`` vs ``--backend hf`` on a small random Qwen2."""
    sys.path.insert(0, str(ROOT / "tests"))
    from rpsft_testing import make_tokenizer

    from rpsft.data.synthetic_math import generate
    from rpsft.eval import run_eval
    from rpsft.fileio import read_jsonl, write_jsonl

    tok = make_tokenizer(vocab_size=400)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # a larger init scale than training's 0.02: peaked logits, so greedy choices are not near-ties
        model = qwen2("tiny", torch.device("cpu"), torch.float32, seed=2, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=len(tok),
                      initializer_range=0.1, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in generate(n_prompts, seed=7)]
        write_jsonl(tmp / "prompts.jsonl", rows)
        runs = {}
        for backend in ("hf", "vllm"):
            opts = dict(dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5, enforce_eager=True) \
                if backend == "vllm" else None
            t = time.perf_counter()
            run_eval(str(tmp / "model"), str(tmp / "prompts.jsonl"), greedy=True, backend=backend,
                     out_dir=tmp / backend, max_new_tokens=max_new_tokens, system_prompt="none",
                     vllm_options=opts)
            runs[backend] = ({(r["index"]): r["completion"] for r in read_jsonl(tmp / backend / "samples.jsonl")},
                             time.perf_counter() - t)
    hf, vl = runs["hf"][0], runs["vllm"][0]
    same = sum(hf[i] == vl[i] for i in hf)
    prefix = []
    for i in hf:
        a, b = tok(hf[i]).input_ids, tok(vl[i]).input_ids
        j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(j)
    return {"identical": same, "n": len(hf), "mean_prefix": statistics.mean(prefix),
            "max_new_tokens": max_new_tokens, "hf_s": runs["hf"][1], "vllm_s": runs["vllm"][1]}


def run_checks(args) -> list[tuple[str, str, str]]:
    """All rows as (check, value, goal). A failing check becomes an ``error: ...`` row; the others still run."""
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    dtype = getattr(torch, args.dtype)
    rows: list[tuple[str, str, str]] = []

    def guarded(name: str, fn):
        try:
            return fn()
        except Exception as e:  # a check script reports every row it can
            rows.append((name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", ""))
            return None
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.bases_layout != "none":
        b = guarded(f"bases ({args.bases_layout})",
                    lambda: check_bases(args.bases_layout, device, dtype, args.k, args.svd))
        if b is not None:
            rows.append((f"bases ({args.bases_layout}, k={args.k}, svd={args.svd}, {b['matrices']} matrices)",
                         f"{b['seconds']:.1f} s", "<= 20 s (7B layout)"))
            del b

    b = guarded(f"bases ({args.layout})", lambda: check_bases(args.layout, device, dtype, args.k, args.svd))
    if b is None:
        return rows
    anchor, model = b["anchor"], b["model"]
    rows.append((f"bases ({args.layout}, k={args.k}, svd={args.svd}, {b['matrices']} matrices)", f"{b['seconds']:.1f} s", ""))
    rows.append(("anchor memory on device (measured / formula)",
                 f"{fmt_gib(b['measured_bytes'])} / {fmt_gib(b['nbytes'])}" if device.type == "cuda"
                 else f"- / {fmt_gib(b['nbytes'])}", "measured ≈ formula"))
    p = guarded("penalty at init", lambda: check_penalty_at_init(anchor, model))
    if p is not None:
        rows.append(("penalty at init: R, max ‖A‖/‖σ_k‖", f"{p['R']:.3e}, {p['max_rel']:.1e}", "fp32 round-off"))
    s = guarded("step ratio", lambda: check_step_ratio(model, anchor, device, args.micro_batch, args.seq_len,
                                                       args.grad_accum, args.pairs))
    if s is not None:
        rows.append((f"RPSFT/SFT step time ({s['tokens']} tokens/step, {args.pairs} interleaved pairs)",
                     f"{s['ratio']:.3f} (min {s['ratio_min']:.3f}, max {s['ratio_max']:.3f}; "
                     f"SFT {s['sft_s']:.2f} s, RPSFT {s['rpsft_s']:.2f} s)", "<= 1.02 at 16×4096"))
    del anchor, model, b
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if device.type == "cuda":
        c = guarded("placement", lambda: check_placement(device))
        if c is not None:
            rows.append(("anchor built on CPU follows the model to the GPU",
                         f"penalty on {c['penalty_device']}, terms on {c['terms_on']}, ∇ rel err "
                         f"{c['grad_rel_err']:.1e}", "cuda, ∇ ≈ CPU's"))
    else:
        rows.append(("anchor built on CPU follows the model to the GPU", "skipped (no GPU)", ""))

    if args.vllm and device.type == "cuda" and importlib.util.find_spec("vllm") is not None:
        v = guarded("vllm greedy agreement", check_vllm)
        if v is not None:
            rows.append(("vllm vs hf greedy (random Qwen2, bf16)",
                         f"{v['identical']}/{v['n']} identical, mean agreed prefix {v['mean_prefix']:.1f} of "
                         f"{v['max_new_tokens']} tokens (hf {v['hf_s']:.0f} s, vllm {v['vllm_s']:.0f} s)", ""))
    else:
        why = "disabled" if not args.vllm else ("no GPU" if device.type != "cuda" else "vllm not installed")
        rows.append(("vllm vs hf greedy", f"skipped ({why})", ""))
    return rows


def print_table(rows, args, wall_s: float, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    table = Table(title=f"rpsft GPU check: {dev}, torch {torch.__version__}, {args.dtype} weights, "
                        f"fp32 anchor, wall {wall_s:.0f} s")
    for c in ("check", "value", "goal"):
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny layouts and sizes (for --device cpu / the tests)")
    ap.add_argument("--layout", default="qwen2.5-1.5b", choices=sorted(LAYOUTS))
    ap.add_argument("--bases-layout", default="qwen2.5-7b", choices=sorted(LAYOUTS) + ["none"],
                    help="an extra layout timed for bases only ('none' to skip)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--svd", default="exact", choices=("exact", "gram"), help="bases solver (anchor.svd)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=4, help="interleaved SFT/RPSFT step pairs after one warm-up pair")
    ap.add_argument("--no-vllm", dest="vllm", action="store_false")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layout, args.bases_layout, args.k = "tiny", "tiny", 8
        args.micro_batch, args.seq_len, args.grad_accum, args.pairs = 2, 32, 2, 2
    return args


def main(argv=None, console=None) -> list[tuple[str, str, str]]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "`--device cpu --tiny` for the table on tiny shapes", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.perf_counter()
    rows = run_checks(args)
    print_table(rows, args, time.perf_counter() - t0, console)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("check", "value", "goal"), r)) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
