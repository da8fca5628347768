"""`rpsft analyze ...`: the paper's diagnostics as commands. Each writes <out>/<name>.json (+ .csv where tabular)
and <name>.png, and prints a short table. Heavy imports (torch, transformers, matplotlib) happen inside the
commands so `rpsft --help` stays fast."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import List, Optional

import typer

from ..terminal import friendly_errors, progress_bar

app = typer.Typer(
    help="Diagnostics from the paper: gradient energy & rank selection, subspace rotation, first-order loss "
         "change, representation drift, output entropy, where the update goes (blocks). Each writes JSON/CSV and "
         "a PNG.",
    no_args_is_help=True,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
MATRICES_HELP = ("comma-separated module patterns (a name like q_proj, a glob like 'model.layers.1*.mlp.*', or "
                 "re:<regex>); default: the seven projections q,k,v,o,gate,up,down")
LAYERS_HELP = "layer indices, e.g. '0' or '0-9,20' (default: all)"


def _out(out: Optional[Path], command: str) -> Path:
    return out if out is not None else Path("results") / "analyze" / command


def _locked(command: str):
    """The command runs holding its --out directory's run lock: a second process writing there is refused with one
    line naming this one (rpsft.runlock)."""
    from ..runlock import locked

    return locked(f"rpsft analyze {command}", lambda a: _out(a["out"], command), what="--out")


def _csv(path: Path, rows: list[dict]) -> None:
    from ..fileio import write_text

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_text(path, buf.getvalue())


def _run(fn, progress: Optional[str] = None):
    """``fn(cb)`` — under a progress bar named ``progress`` whose callback is ``cb`` (None without one)."""
    if progress is None:
        return fn(None)
    prog, cb = _progress(progress)
    with prog:
        return fn(cb)


def _short(name: str) -> str:
    """Table display only (files keep full parameter names): model.layers.0.self_attn.q_proj.weight -> layers.0.self_attn.q_proj"""
    name = name.removesuffix(".weight")
    return name.removeprefix("model.")


def _console():
    from rich.console import Console

    return Console()


def _progress(description: str):
    """A rich progress bar and a callback(done, total) that advances it."""
    prog = progress_bar(description, eta=False, transient=True)
    task = prog.add_task(description, total=None)

    def cb(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    return prog, cb


def _ints(value: Optional[str], what: str) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in out):
        raise typer.BadParameter(f"{what} must be >= 1, got {value!r}")
    return out


def _ckpts(value: str, what: str) -> list[str]:
    from ._common import parse_csv

    items = parse_csv(value)
    if not items:
        raise typer.BadParameter(f"{what} needs at least one checkpoint (comma-separated for several)")
    return items


@friendly_errors
@_locked("energy")
def energy(
    data: Path = typer.Option(..., "--data", help="prompt/completion data (JSONL: messages, prompt+completion, "
                                                  "ShareGPT or GSM8K question+answer)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="base model (embedded name or checkpoint dir)"),
    matrices: Optional[str] = typer.Option(None, "--matrices", help=MATRICES_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=LAYERS_HELP),
    ranks: Optional[str] = typer.Option("8,32,64,128,256", "--ranks", help="r values at which to report y(r)"),
    target: float = typer.Option(0.20, "--target", help="energy share that picks k (paper App. C.5: 0.20)"),
    match_rank: Optional[int] = typer.Option(None, "--match-rank", help="instead of --target, pick the target whose "
                                             "rank map has the anchor memory (fp32) of uniform k = this (compare at equal memory)"),
    limit: int = typer.Option(16, "--limit", help="number of samples (per-sample gradients)"),
    max_length: int = typer.Option(1024, "--max-length", help="truncate prompt+completion to this many tokens"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/energy)"),
):
    """Gradient energy in the pretrained top-r frame (App. F.1, Fig. 2) and a per-matrix rank map."""
    from rich.table import Table

    from ..fileio import write_json
    from .energy import run_energy
    from .plots import plot_energy

    out = _out(out, "energy")
    rlist = _ints(ranks, "--ranks") or []
    rep = _run(lambda cb: run_energy(model, str(data), targets=matrices, layers=layers, limit=limit,
                                     max_length=max_length, target=target, ranks=rlist, progress=cb,
                                     match_rank=match_rank),
               progress="per-sample gradients")
    target = rep["target"]
    write_json(out / "energy.json", rep)
    write_json(out / "ranks.json", rep["ranks"])
    rows = []
    for m in rep["matrices"]:
        R = m["R"]
        for r, y in enumerate(m["y"], start=1):
            rows.append({"name": m["name"], "type": m["type"], "layer": m["layer"], "r": r, "x": r * r / R / R, "y": y})
    _csv(out / "energy.csv", rows)
    plot_energy(rep, out / "energy.png")
    t = Table(title=f"gradient energy share ({rep['samples']} samples, target {target:.0%})")
    for col in ["matrix", "R", f"r@{target:.0%}", "x at r", *[f"y({r})" for r in rlist]]:
        if col == "matrix":
            t.add_column(col, overflow="fold")
        else:  # numbers never wrap; the name column folds instead on narrow terminals
            t.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for m in rep["matrices"][:40]:
        k = m["rank_for_target"]
        t.add_row(_short(m["name"]), str(m["R"]), str(k) if k else "never", f"{m['x_at_rank']:.4f}" if k else "-",
                  *[f"{m['y_at'][str(r)]:.3f}" if str(r) in m["y_at"] else "-" for r in rlist])
    con = _console()
    con.print(t)
    if len(rep["matrices"]) > 40:
        con.print(f"... {len(rep['matrices']) - 40} more matrices in {out / 'energy.json'}")
    mib = rep["anchor_mib"]
    con.print(f"rank map: target {target:.4g}, anchor {mib['map']:.2f} MiB (fp32)"
              + (f" vs {mib[f'uniform_k{match_rank}']:.2f} MiB at uniform k={match_rank}" if match_rank else ""))
    con.print(f"wrote {out}/energy.json, energy.csv, ranks.json (use: rpsft train --set anchor.rank=@{out / 'ranks.json'}),"
              f" energy.png  [{rep['seconds']['gradients']:.1f}s gradients]")


@friendly_errors
@_locked("rotation")
def rotation(
    tuned: str = typer.Option(..., "--tuned", help="tuned checkpoint dir(s), comma-separated"),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="base model (embedded name or checkpoint dir)"),
    matrices: Optional[str] = typer.Option(None, "--matrices", help=MATRICES_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=LAYERS_HELP),
    k: int = typer.Option(512, "--k", help="subspace dimension K (capped at min(m, n); paper: 512)"),
    matrix: Optional[str] = typer.Option(None, "--matrix", help="parameter for the rankwise curve "
                                                               "(default: the first selected q_proj)"),
    rank_points: int = typer.Option(64, "--rank-points", help="number of prefix ranks on the rankwise curve"),
    labels: Optional[str] = typer.Option(None, "--labels", help="legend labels, one per --tuned checkpoint"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/rotation)"),
):
    """Principal angles between base and tuned top-K singular subspaces (App. F.3, Figs 6-7)."""
    from rich.table import Table

    from ..fileio import write_json
    from ._common import parse_csv
    from .plots import plot_rotation
    from .rotation import run_rotation

    out = _out(out, "rotation")
    rep = _run(lambda cb: run_rotation(base, _ckpts(tuned, "--tuned"), targets=matrices, layers=layers, K=k,
                                       matrix=matrix, rank_points=rank_points, labels=parse_csv(labels),
                                       progress=cb), progress="SVDs")
    write_json(out / "rotation.json", rep)
    _csv(out / "rotation.csv", [{"checkpoint": ck["label"], **{k2: v for k2, v in r.items() if k2 != "shape"},
                                 "shape": "x".join(map(str, r["shape"]))}
                                for ck in rep["checkpoints"] for r in ck["matrices"]])
    plot_rotation(rep, out / "rotation.png")
    t = Table(title=f"mean principal angle (degrees), K = min({k}, m, n)")
    for col in ["checkpoint", "layer-mean U", "layer-mean V", "max-layer U", "max-layer V", "rankwise U @ K"]:
        t.add_column(col, justify="left" if col == "checkpoint" else "right", no_wrap=col == "checkpoint")
    for ck in rep["checkpoints"]:
        lm = ck["layer_mean"]
        lu = max((r["u_mean_deg"] for r in ck["layers"]), default=float("nan"))
        lv = max((r["v_mean_deg"] for r in ck["layers"]), default=float("nan"))
        rw = ck["rankwise"]
        t.add_row(ck["label"], f"{lm['u_mean_deg']:.4f}" if lm["u_mean_deg"] is not None else "-",
                  f"{lm['v_mean_deg']:.4f}" if lm["v_mean_deg"] is not None else "-", f"{lu:.4f}", f"{lv:.4f}",
                  f"{rw['u_deg'][-1]:.4f}" if rw else "-")
    con = _console()
    con.print(t)
    rw0 = rep["checkpoints"][0]["rankwise"]
    if rw0:
        con.print(f"rankwise curve: {rw0['matrix']}")
    con.print(f"wrote {out}/rotation.json, rotation.csv, rotation.png  [{rep['seconds']:.1f}s]")


@friendly_errors
@_locked("first-order")
def first_order(
    tuned: str = typer.Option(..., "--tuned", help="tuned checkpoint dir(s), comma-separated"),
    data: Path = typer.Option(..., "--data", help="prompt/completion data for the base-model gradient"),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="base model (embedded name or checkpoint dir)"),
    matrices: Optional[str] = typer.Option(None, "--matrices", help=MATRICES_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=LAYERS_HELP),
    limit: int = typer.Option(16, "--limit", help="number of samples in the gradient batch"),
    batch_size: int = typer.Option(4, "--batch-size", help="micro-batch size for the backward passes"),
    max_length: int = typer.Option(1024, "--max-length", help="truncate prompt+completion to this many tokens"),
    labels: Optional[str] = typer.Option(None, "--labels", help="legend labels, one per --tuned checkpoint"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/first-order)"),
):
    """Per-layer mean of <g_W, W_tuned - W_base>, g_W the base mean gradient (App. F.2, Fig. 5)."""
    from rich.table import Table

    from ..fileio import write_json
    from ._common import parse_csv
    from .first_order import run_first_order
    from .plots import plot_first_order

    out = _out(out, "first-order")
    rep = _run(lambda _: run_first_order(base, _ckpts(tuned, "--tuned"), str(data), targets=matrices,
                                         layers=layers, limit=limit, batch_size=batch_size, max_length=max_length,
                                         labels=parse_csv(labels)))
    write_json(out / "first_order.json", rep)
    _csv(out / "first_order.csv", [{"checkpoint": ck["label"], **r} for ck in rep["checkpoints"]
                                   for r in ck["matrices"]])
    plot_first_order(rep, out / "first_order.png")
    t = Table(title=f"first-order loss change <g, ΔW> ({rep['samples']} samples)")
    for col in ["checkpoint", "sum over matrices", "lowest layer mean", "highest layer mean"]:
        t.add_column(col, justify="right")
    for ck in rep["checkpoints"]:
        lo = min(ck["layers"], key=lambda r: r["mean_inner"], default=None)
        hi = max(ck["layers"], key=lambda r: r["mean_inner"], default=None)
        t.add_row(ck["label"], f"{ck['total_inner']:.4g}",
                  f"{lo['layer']}: {lo['mean_inner']:.3g}" if lo else "-",
                  f"{hi['layer']}: {hi['mean_inner']:.3g}" if hi else "-")
    con = _console()
    con.print(t)
    con.print(f"wrote {out}/first_order.json, first_order.csv, first_order.png  [{rep['seconds']:.1f}s]")


@friendly_errors
@_locked("drift")
def drift(
    tuned: str = typer.Option(..., "--tuned", help="tuned checkpoint dir(s), comma-separated"),
    data: Path = typer.Option(..., "--data", help="prompts (any accepted data format; completions unused)"),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="base model (embedded name or checkpoint dir)"),
    limit: int = typer.Option(64, "--limit", help="number of prompts"),
    batch_size: int = typer.Option(8, "--batch-size", help="forward batch size"),
    labels: Optional[str] = typer.Option(None, "--labels", help="legend labels, one per --tuned checkpoint"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/drift)"),
):
    """Pooled hidden-state drift: centroid distance to the base and a 2-D PCA with arrows (App. F.6, Fig. 8)."""
    from rich.table import Table

    from ..fileio import write_json
    from ._common import parse_csv
    from .drift import run_drift
    from .plots import plot_drift

    out = _out(out, "drift")
    rep = _run(lambda _: run_drift(base, _ckpts(tuned, "--tuned"), str(data), limit=limit, batch_size=batch_size,
                                   labels=parse_csv(labels)))
    write_json(out / "drift.json", rep)
    _csv(out / "drift.csv", [{k: v for k, v in m.items() if not k.startswith("arrow")} for m in rep["models"]])
    plot_drift(rep, out / "drift.png")
    t = Table(title=f"representation drift ({rep['samples']} prompts)")
    for col in ["checkpoint", "centroid distance", "relative", "mean per-sample shift"]:
        t.add_column(col, justify="right")
    for m in rep["models"]:
        t.add_row(m["label"], f"{m['centroid_distance']:.4g}", f"{m['relative_distance']:.4g}",
                  f"{m['mean_sample_shift']:.4g}" if m["mean_sample_shift"] is not None else "-")
    con = _console()
    con.print(t)
    con.print(f"wrote {out}/drift.json, drift.csv, drift.png  [{rep['seconds']:.1f}s]")


@friendly_errors
@_locked("entropy")
def entropy(
    data: Path = typer.Option(..., "--data", help="prompts (any accepted data format; completions unused)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="model(s) to decode with, comma-separated"),
    limit: int = typer.Option(32, "--limit", help="number of prompts"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="greedy decoding length (paper: 128)"),
    batch_size: int = typer.Option(16, "--batch-size", help="generation batch size"),
    labels: Optional[str] = typer.Option(None, "--labels", help="legend labels, one per --model"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/entropy)"),
):
    """Mean token entropy of greedy continuations per sample, with a Gaussian KDE (App. F.4)."""
    from rich.table import Table

    from ..fileio import write_json
    from ._common import parse_csv
    from .entropy import run_entropy
    from .plots import plot_entropy

    out = _out(out, "entropy")
    rep = _run(lambda cb: run_entropy(_ckpts(model, "--model"), str(data), limit=limit,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      labels=parse_csv(labels), progress=cb), progress="models decoded")
    write_json(out / "entropy.json", rep)
    _csv(out / "entropy.csv", [{"model": m["label"], "sample": i, "mean_entropy": e, "generated_tokens": n}
                               for m in rep["models"] for i, (e, n) in enumerate(zip(m["entropies"], m["lengths"]))])
    plot_entropy(rep, out / "entropy.png")
    t = Table(title=f"greedy-decoding token entropy, nats ({rep['samples']} prompts)")
    for col in ["model", "mean", "std", "KDE bandwidth", "mean length", "seconds"]:
        t.add_column(col, justify="right")
    for m in rep["models"]:
        t.add_row(m["label"], f"{m['mean']:.4f}", f"{m['std']:.4f}",
                  f"{m['kde']['bandwidth']:.4g}" if m["kde"] else "-",
                  f"{sum(m['lengths']) / len(m['lengths']):.1f}", f"{m['seconds']:.1f}")
    con = _console()
    con.print(t)
    con.print(f"wrote {out}/entropy.json, entropy.csv, entropy.png")


@friendly_errors
@_locked("blocks")
def blocks(
    tuned: List[str] = typer.Option(..., "--tuned", help="tuned checkpoint dir(s): repeat the option or "
                                                       "comma-separate"),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="base model (embedded name or checkpoint dir)"),
    rank: str = typer.Option("128", "--rank", "-k", help="the frame's k as training takes anchor.rank: an int, a "
                                                         "fraction of min(m, n), a mapping {pattern: k}, or "
                                                         "@ranks.json"),
    matrices: Optional[str] = typer.Option(None, "--matrices", "--targets", help=MATRICES_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=LAYERS_HELP),
    svd: str = typer.Option("exact", "--svd", help="solver of the base's bases: exact | gram (cached on disk "
                                                   "like training's)"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="bases cache (default: <RPSFT_CACHE>/bases, "
                                                                       "shared with training)"),
    labels: Optional[str] = typer.Option(None, "--labels", help="legend labels, one per tuned checkpoint"),
    out: Optional[Path] = typer.Option(None, "--out", help="output dir (default: results/analyze/blocks)"),
):
    """Where the update goes: ΔW split into the four blocks of the base's top-k singular frame (App. C.3)."""
    from rich.table import Table

    from ..config import parse_value
    from ..fileio import write_json
    from ._common import parse_csv
    from .blocks import run_blocks
    from .plots import plot_blocks

    out = _out(out, "blocks")
    ckpts = [c for t in tuned for c in _ckpts(t, "--tuned")]
    rank_value = parse_value(rank)  # 128 -> int, 0.25 -> float, {q_proj: 64, '*': 128} -> mapping, @file -> str
    rep = _run(lambda cb: run_blocks(base, ckpts, rank=rank_value, targets=matrices, layers=layers, svd=svd,
                                     cache_dir=str(cache_dir) if cache_dir is not None else None,
                                     labels=parse_csv(labels), progress=cb), progress="matrices")
    write_json(out / "blocks.json", rep)
    _csv(out / "blocks.csv", [{"checkpoint": ck["label"], "name": r["name"], "type": r["type"], "layer": r["layer"],
                               "shape": "x".join(map(str, r["shape"])), "k": r["k"],
                               **{f"energy_{b}": r["energy"][b] for b in ("A", "B", "C", "D", "total")},
                               **{f"share_{b}": r["share"][b] for b in ("A", "B", "C", "D")},
                               "isotropic_A": r["isotropic"]["A"], "relative": r["relative"]}
                              for ck in rep["checkpoints"] for r in ck["matrices"]])
    plot_blocks(rep, out / "blocks.png")
    t = Table(title=f"% of ‖ΔW‖² per block of the base's top-k frame (k: {rank}); iso A: an isotropic update's")
    for col in ["checkpoint", "type", "‖ΔW‖/‖W0‖", "A", "B", "C", "D", "iso A"]:
        if col == "checkpoint":
            t.add_column(col, overflow="fold")
        else:  # numbers and type names never wrap; the checkpoint column folds instead on narrow terminals
            t.add_column(col, justify="left" if col == "type" else "right", no_wrap=True, min_width=len(col))
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for ck in rep["checkpoints"]:
        for g in [*ck["types"], {"type": "all", **ck["all"]}]:
            t.add_row(ck["label"], g["type"], "–" if g["relative"] is None else f"{g['relative']:.3g}",
                      *[pct(g["share"][b]) for b in ("A", "B", "C", "D")], pct(g["isotropic"]["A"]))
    con = _console()
    con.print(t)
    con.print(f"wrote {out}/blocks.json, blocks.csv, blocks.png  [{rep['seconds']['total']:.1f}s, of which "
              f"{rep['seconds']['bases']:.1f}s bases]")


app.command("energy")(energy)
app.command("rotation")(rotation)
app.command("first-order")(first_order)
app.command("drift")(drift)
app.command("entropy")(entropy)
app.command("blocks")(blocks)
