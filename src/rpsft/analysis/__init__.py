"""The paper's diagnostics (App. F): gradient energy & rank selection, subspace rotation, first-order loss change,
representation drift, output entropy; and where an update goes in the base's singular frame (App. C.3 blocks).
See docs/analysis.md.

Names are resolved lazily so that importing the package (e.g. for the CLI) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EnergyCurve": "energy", "energy_curve": "energy", "gradient_energy": "energy", "prefix_share": "energy",
    "rank_map": "energy", "run_energy": "energy", "target_matching_rank": "energy", "anchor_elements": "energy",
    "principal_angles": "rotation", "mean_angle_deg": "rotation", "matrix_rotation": "rotation",
    "rankwise": "rotation", "run_rotation": "rotation",
    "mean_gradient": "first_order", "run_first_order": "first_order",
    "pooled_hidden": "drift", "pca_2d": "drift", "drift_summary": "drift", "run_drift": "drift",
    "token_entropy": "entropy", "generation_entropies": "entropy", "silverman_bandwidth": "entropy",
    "gaussian_kde": "entropy", "run_entropy": "entropy",
    "block_split": "blocks", "matrix_blocks": "blocks", "roundoff_bound": "blocks", "isotropic_shares": "blocks",
    "run_blocks": "blocks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
