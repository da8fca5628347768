"""The cost table of ``rpsft bench`` as markdown: one row per method, ratios against sft when sft ran."""

from __future__ import annotations

from ..terminal import fmt


def markdown_table(report: dict) -> str:
    """The cost table as markdown: one row per method, ratios against sft when sft ran."""
    rows = report["methods"]
    s = report["settings"]
    base = rows.get("sft", {})
    base_step = base.get("step_seconds_median") if base.get("status") == "ok" else None
    base_mem = base.get("peak_rss_mib") if base.get("status") == "ok" else None
    gpu = any("cuda_max_allocated_mib" in r for r in rows.values())
    head = ["method", "status", "steps/s", "samples/s", "step s (median)", "step vs sft", "peak RSS MiB",
            "RSS vs sft"]
    if gpu:
        head += ["CUDA max alloc MiB", "CUDA max reserved MiB"]
    head += ["anchor MiB", "anchor % of step", "bases s"]
    lines = [f"Cost per method: {s['model']}, {s['steps']} optimizer steps (first is warm-up), batch "
             f"{s['batch_size']} × grad accum {s['grad_accum']}, max length {s['max_length']}, k = {s['rank']}, "
             f"median of {s['repeats']} repeat(s).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m, r in rows.items():
        if r.get("status") != "ok":
            reason = (r.get("error") or "").strip().splitlines()
            cells = [m, f"{r.get('status')}: {reason[-1][:120] if reason else ''}".replace("|", "/")]
            cells += ["–"] * (len(head) - 2)
        else:
            step = r["step_seconds_median"]
            cells = [m, "ok", fmt(r["steps_per_s"], ".3f"), fmt(r["samples_per_s"], ".2f"), fmt(step, ".3f"),
                     fmt(step / base_step if base_step else None, ".3f"), fmt(r.get("peak_rss_mib"), ".0f"),
                     fmt(r["peak_rss_mib"] / base_mem if base_mem else None, ".3f")]
            if gpu:
                cells += [fmt(r.get("cuda_max_allocated_mib"), ".0f"), fmt(r.get("cuda_max_reserved_mib"), ".0f")]
            cells += [fmt(r.get("anchor_bytes", 0) / 2**20, ".1f"),
                      fmt(100 * r.get("anchor_share_of_step", 0.0), ".2f"), fmt(r.get("bases_seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
