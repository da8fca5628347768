"""PNG figures for the analyses, drawn from their JSON reports (so a figure can be redrawn from saved results).

matplotlib with the Agg backend: no display is needed, and importing this module never opens a window.
"""

from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_path

TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)


def _short_path(p: str) -> str:
    path = Path(p)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _type_colors(types):
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    order = [t for t in TYPE_ORDER if t in types] + sorted(t for t in types if t not in TYPE_ORDER)
    return {t: cmap(i % 10) for i, t in enumerate(order)}


def plot_energy(report: dict, path: str | Path) -> None:
    """Left: y(r) against x(r) = r²/R² with the isotropic-gradient reference y = x·min(m,n)/max(m,n) per aspect
    ratio (Fig. 2; y = x for square W). Right: y against r with the target share."""
    import numpy as np

    plt = pyplot()
    mats = report["matrices"]
    colors = _type_colors({m["type"] for m in mats})
    few = len(mats) <= 8
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    seen = set()
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(mats):
        y = np.asarray(m["y"])
        r = np.arange(1, len(y) + 1)
        x = r ** 2 / m["R"] ** 2
        k = m["rank_for_target"]
        label = (f"{m['name']} (r={k})" if k else m["name"]) if few else (m["type"] if m["type"] not in seen else None)
        seen.add(m["type"])
        color = cmap(i % 10) if few else colors[m["type"]]  # few curves: one colour each; many: one per type
        kw = dict(color=color, lw=1.6 if few else 0.8, alpha=1.0 if few else 0.6, label=label)
        a.plot(x, y, **kw)
        b.plot(r, y, **kw)
        if few and k:
            b.plot([k], [y[k - 1]], "o", color=color)
            if len(mats) == 1:  # several labels would collide; the legend carries r then
                b.annotate(f"r={k}", (k, y[k - 1]), textcoords="offset points", xytext=(6, -12), fontsize=9)
    # an isotropic random gradient puts r²/(m·n) of its energy in the top r×r block: y = x·min(m,n)/max(m,n),
    # one reference line per aspect ratio present (y = x only for square matrices)
    for end in sorted({min(m["shape"]) / max(m["shape"]) for m in mats}, reverse=True):
        a.plot([0, 1], [0, end], "k--" if end == 1 else "k:", lw=1,
               label="y = x (isotropic gradient, square W)" if end == 1 else
               f"y = {end:.3g}·x (isotropic gradient, min/max = {end:.3g})")
    a.set(xlabel="x(r) = r² / R²  (area of the anchored block)", ylabel="y(r)  (share of gradient energy)",
          xlim=(0, 1), ylim=(0, 1.02), title="Gradient energy in the top-r frame")
    b.axhline(report["target"], color="gray", ls=":", lw=1, label=f"target {report['target']:.0%}")
    b.set(xlabel="r", ylabel="y(r)", ylim=(0, 1.02), title=f"{report['samples']} samples · {_short_path(report['data'])}")
    a.legend(fontsize=8, loc="lower right")
    b.legend(fontsize=8, loc="upper left")
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    _save(fig, path)


def plot_rotation(report: dict, path: str | Path) -> None:
    """Layerwise mean angle (U and V space) per checkpoint, and the rankwise prefix curve of one matrix."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("tab10")
    for c, ck in enumerate(report["checkpoints"]):
        color = cmap(c % 10)
        layers = [r["layer"] for r in ck["layers"]]
        lm = ck["layer_mean"]
        axes[0].plot(layers, [r["u_mean_deg"] for r in ck["layers"]], "o-", ms=3, color=color,
                     label=f"{ck['label']} (mean {lm['u_mean_deg']:.3g}°)" if lm["u_mean_deg"] is not None else ck["label"])
        axes[1].plot(layers, [r["v_mean_deg"] for r in ck["layers"]], "o-", ms=3, color=color,
                     label=f"{ck['label']} (mean {lm['v_mean_deg']:.3g}°)" if lm["v_mean_deg"] is not None else ck["label"])
        rw = ck.get("rankwise")
        if rw:
            axes[2].plot(rw["r"], rw["u_deg"], "-", color=color, label=f"{ck['label']} U")
            axes[2].plot(rw["r"], rw["v_deg"], "--", color=color, label=f"{ck['label']} V")
    K = report["K"]
    axes[0].set(xlabel="layer", ylabel="mean principal angle (°)", title=f"U space, top-K (K = min({K}, m, n))")
    axes[1].set(xlabel="layer", ylabel="mean principal angle (°)", title="V space")
    rw0 = next((ck["rankwise"] for ck in report["checkpoints"] if ck.get("rankwise")), None)
    axes[2].set(xlabel="prefix rank r", ylabel="mean angle over top-r (°)",
                title=f"rankwise: {rw0['matrix'] if rw0 else ''}")
    axes[2].title.set_fontsize(9)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def plot_first_order(report: dict, path: str | Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for ck in report["checkpoints"]:
        ax.plot([r["layer"] for r in ck["layers"]], [r["mean_inner"] for r in ck["layers"]], "o-", ms=3,
                label=f"{ck['label']} (Σ = {ck['total_inner']:.3g})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="layer", ylabel="mean ⟨g_W, W_tuned − W_base⟩ over projections",
           title=f"First-order loss change per layer ({report['samples']} samples; < 0 = downhill)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_drift(report: dict, path: str | Path) -> None:
    """2-D PCA of pooled hidden states; arrows run from the base centroid to each tuned centroid. Left: all
    points; right: the same axes zoomed onto the centroids, where the arrows are visible even when the
    prompt-to-prompt spread dwarfs the drift."""
    import numpy as np

    plt = pyplot()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12.5, 5.4))
    cmap = plt.get_cmap("tab10")
    pts = report["pca"]["points"]
    colors = {lab: cmap(i % 10) for i, lab in enumerate(pts)}
    for lab, p in pts.items():
        p = np.asarray(p)
        ax.scatter(p[:, 0], p[:, 1], s=12, alpha=0.55, color=colors[lab], label=lab)
    ends = []
    for a in (ax, zoom):
        for m in report["models"]:
            (x0, y0), (x1, y1) = m["arrow_start"], m["arrow_end"]
            a.annotate("", xy=(x1, y1), xytext=(x0, y0),
                       arrowprops=dict(arrowstyle="-|>", color=colors[m["label"]], lw=2))
            a.plot([x1], [y1], "*", ms=12, color=colors[m["label"]], mec="k",
                   label=f"{m['label']} (d = {m['centroid_distance']:.3g})" if a is zoom else None)
            ends.append((x1, y1))
        if report["models"]:
            x0, y0 = report["models"][0]["arrow_start"]
            a.plot([x0], [y0], "*", ms=12, color=colors["base"], mec="k", label="base" if a is zoom else None)
            ends.append((x0, y0))
    if ends:
        e = np.asarray(ends)
        lo, hi = e.min(0), e.max(0)
        pad = np.maximum((hi - lo) * 0.25, 1e-9 + 0.05 * np.abs(e).max())
        zoom.set(xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]))
    ev = report["pca"]["explained_variance_ratio"]
    for a in (ax, zoom):
        a.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_title(f"Pooled final hidden states, {report['samples']} prompts (★ centroids)")
    zoom.set_title("Centroids: arrows from the base (d = distance in full space)")
    _save(fig, path)


def plot_entropy(report: dict, path: str | Path) -> None:
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    top = max((max(m["kde"]["density"]) for m in report["models"] if m["kde"]), default=1.0)
    for i, m in enumerate(report["models"]):
        color = cmap(i % 10)
        if m["kde"]:
            ax.plot(m["kde"]["grid"], m["kde"]["density"], color=color,
                    label=f"{m['label']} (mean {m['mean']:.3f}, h = {m['kde']['bandwidth']:.3g})")
        e = np.asarray(m["entropies"])
        ax.plot(e, np.full_like(e, -0.04 * top * (i + 1)), "|", color=color, ms=8)
    ax.set(xlabel="mean token entropy per sample (nats)", ylabel="density",
           title=f"Greedy-decoding entropy (≤ {report['max_new_tokens']} new tokens, {report['samples']} prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


BLOCK_COLORS = {"A": "#1f77b4", "B": "#ff7f0e", "C": "#2ca02c", "D": "#d62728"}
BLOCK_LABELS = {"A": "A = U_kᵀΔW V_k (anchored)", "B": "B = U_kᵀΔW V_⊥", "C": "C = U_⊥ᵀΔW V_k",
                "D": "D = U_⊥ᵀΔW V_⊥"}
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")


def plot_blocks(report: dict, path: str | Path) -> None:
    """Stacked shares of ‖ΔW‖² in the four blocks of the base's top-k frame (App. C.3), by matrix type (left)
    and by layer (right); the checkpoints side by side in each group (told apart by hatching), and the share an
    isotropic update would put in A as a black tick."""
    plt = pyplot()
    from matplotlib.patches import Patch

    cks = report["checkpoints"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    width = 0.8 / max(len(cks), 1)
    for ax, key in zip(axes, ("types", "layers")):
        groups = list(dict.fromkeys(g["type" if key == "types" else "layer"] for ck in cks for g in ck[key]))
        for c, ck in enumerate(cks):
            by = {g["type" if key == "types" else "layer"]: g for g in ck[key]}
            xs = [i - 0.4 + width * (c + 0.5) for i in range(len(groups))]
            bottom = [0.0] * len(groups)
            for b in ("A", "B", "C", "D"):
                h = [((by[g]["share"][b] or 0.0) if g in by else 0.0) for g in groups]
                ax.bar(xs, h, width * 0.92, bottom=bottom, color=BLOCK_COLORS[b], hatch=HATCHES[c % len(HATCHES)],
                       edgecolor="white", lw=0.3)
                bottom = [u + v for u, v in zip(bottom, h)]
            iso = [by[g]["isotropic"]["A"] if g in by and by[g]["share"]["A"] is not None else None for g in groups]
            ax.hlines([v for v in iso if v is not None], [x - width * 0.46 for x, v in zip(xs, iso) if v is not None],
                      [x + width * 0.46 for x, v in zip(xs, iso) if v is not None], color="black", lw=1.2)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=0 if key == "layers" else 20,
                      fontsize=8 if key == "layers" and len(groups) > 16 else 9)
        ax.set(ylim=(0, 1.0), xlim=(-0.6, len(groups) - 0.4), ylabel="share of ‖ΔW‖²",
               xlabel="matrix type" if key == "types" else "layer")
        ax.grid(alpha=0.3, axis="y")
    blocks = [Patch(color=BLOCK_COLORS[b], label=BLOCK_LABELS[b]) for b in ("A", "B", "C", "D")]
    marks = [Patch(facecolor="white", edgecolor="gray", hatch=HATCHES[c % len(HATCHES)], label=ck["label"])
             for c, ck in enumerate(cks)] if len(cks) > 1 else []
    from matplotlib.lines import Line2D

    iso = [Line2D([], [], color="black", lw=1.2, label="A share of an isotropic update")]
    axes[1].legend(handles=blocks + iso + marks, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    rank = report["rank"]
    axes[0].set_title(f"Blocks of ΔW in the base's top-k frame (k: {rank})", fontsize=10)
    axes[1].set_title(", ".join(f"{ck['label']}: A {_pct(ck['all']['share']['A'])}, D {_pct(ck['all']['share']['D'])}"
                                for ck in cks[:4]) + (" ..." if len(cks) > 4 else ""), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"
