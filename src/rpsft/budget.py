"""Rotation budget: hold the anchored block's relative drift at ε by adapting λ (``--set anchor.budget=ε``).

The quantity held is the relative drift of the anchored k×k blocks (Eq. 3's residual, summed over matrices)

    d = sqrt( Σ_i ‖A_i‖²_F / Σ_i ‖σ_{k,i}‖² ),     A_i = U_kᵀ W_i V_k − diag σ_k

— ``d = 0.01`` means the pretrained top-k frames have moved by 1 % of their own norm. ``budget_scope=type`` keeps
one d and one λ per matrix type (q_proj, k_proj, …; k/v projections drift fastest), ``all`` one for the block.

Controller: multiplicative, in log space (the adaptive-KL controller of RLHF, Ziegler et al. 2019, with the clipped
error measured as a ratio):

    e_t = clip(ln(d_t / ε), −1, 1),      λ_{t+1} = clip(λ_t · exp(rate · e_t), λ_min, λ_max)

Why multiplicative and not dual ascent λ += η(d − ε): the λ that holds a given ε spans orders of magnitude with the
learning rate, the number of steps, k and the model (λ = 1 is ~2 % of the task gradient in the demo regime), so an
additive step η has no scale that works across them, while a log-space step moves λ by the same *factor* whatever
its size. The error is clipped so that one step changes λ by at most ×e^{±rate} (rate 0.2: ±22 %): d starts at 0
(W = W0), and an unclipped ln(0/ε) would throw λ to its floor on step one. λ_min > 0 because a multiplicative
controller cannot come back from 0; the default bounds [1e-6, 1e6] are wide enough to reach from λ = 1 both a
negligible anchor (1e-6 of the paper's default) and a hard one, in ln(1e6)/0.2 ≈ 69 steps.

d comes from ``anchor.last_sq``, which ``accumulate_grad_`` (or ``penalty(record=True)``, the autograd/DeepSpeed
path) fills at no extra cost; under FSDP2 those values are already all-reduced, so every rank computes the same λ.
λ_t is applied at step t and d_t, measured at the same pass (before the optimizer moves W), sets λ_{t+1}. With
``period > 1`` the controller acts on the steps where the anchor is applied. The state (λ per group, the last d, the
number of updates) is a small JSON file in every checkpoint (:data:`STATE_FILE`), so ``--resume latest`` continues
the same λ trajectory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .selection import matrix_type

STATE_FILE = "rpsft_budget.json"
SCOPES = ("all", "type")


def check_budget_config(a: Any) -> None:
    """The budget keys of an ``anchor`` config section, checked before anything loads (ConfigError, one line)."""
    from .config import ConfigError

    if a.budget is None:
        return
    eps = a.budget
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"anchor.budget must be a relative drift ε > 0 (e.g. 0.01 = 1 % of ‖σ_k‖), got {eps!r}")
    if a.budget_scope not in SCOPES:
        raise ConfigError(f"anchor.budget_scope must be all or type, got {a.budget_scope!r}")
    if not (math.isfinite(a.lam_min) and math.isfinite(a.lam_max)) or a.lam_min <= 0 or a.lam_max < a.lam_min:
        raise ConfigError(f"anchor.lam_min={a.lam_min:g} and anchor.lam_max={a.lam_max:g} admit no λ for the budget: "
                          "need 0 < lam_min <= lam_max (a multiplicative controller cannot leave λ = 0)")
    if not (math.isfinite(a.budget_rate) and a.budget_rate > 0):
        raise ConfigError(f"anchor.budget_rate must be > 0 (λ changes by at most ×e^±rate per step), got "
                          f"{a.budget_rate!r}")


def check_budget_method(a: Any, run: str, use_anchor: bool, fix: str | None = None) -> None:
    """A budget needs an anchor to adapt; raise (one line) before the model loads when the run has none."""
    from .config import ConfigError

    if a.budget is not None and not use_anchor:
        raise ConfigError(f"anchor.budget={a.budget:g} needs the rotation anchor, and {run} runs without it; "
                          + (fix or "use method=rpsft (or rpsft_lora), set anchor.enabled=true where the method allows it "
                                 "(sft, dft, iw), or drop anchor.budget"))


class BudgetController:
    """λ per group (one group, or one per matrix type) adapted to hold the relative drift d at ``budget``."""

    def __init__(self, budget: float, lam: float = 1.0, lam_min: float = 1e-6, lam_max: float = 1e6,
                 rate: float = 0.2, scope: str = "all", kp: float = 1.0):
        if scope not in SCOPES:
            raise ValueError(f"budget scope must be one of {SCOPES}, got {scope!r}")
        self.budget = float(budget)
        self.lam0 = min(max(float(lam), lam_min), lam_max)  # anchor.lam, put inside the bounds
        self.lam_min, self.lam_max, self.rate, self.scope = float(lam_min), float(lam_max), float(rate), scope
        self.kp = float(kp)
        self.lam: dict[str, float] = {}  # group -> λ (groups appear with the first measurement)
        self.drift: dict[str, float] = {}  # group -> the last measured d
        self.total_drift = 0.0  # d over every anchored matrix (what rpsft/drift logs)
        self.integral: dict[str, float] = {}  # group -> the integral part of log λ
        self.updates = 0

    @classmethod
    def from_config(cls, a: Any) -> "BudgetController | None":
        if a.budget is None:
            return None
        return cls(a.budget, a.lam, a.lam_min, a.lam_max, a.budget_rate, a.budget_scope)

    def group(self, name: str) -> str:
        return matrix_type(name) if self.scope == "type" else "all"

    def weight(self, names) -> float | dict[str, float]:
        """λ for ``accumulate_grad_`` / ``penalty``: a float (scope=all) or a mapping matrix name -> λ of its type."""
        if self.scope == "all":
            return self.lam.get("all", self.lam0)
        return {n: self.lam.get(self.group(n), self.lam0) for n in names}

    def measure(self, anchor, scope: str | None = None) -> dict[str, float]:
        """d per group from ``anchor.last_sq`` (the ‖A‖² of the latest anchor pass) and each term's ‖σ_k‖²."""
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for name, sq in anchor.last_sq.items():
            g = matrix_type(name) if (scope or self.scope) == "type" else "all"
            num[g] = num.get(g, 0.0) + max(float(sq), 0.0)
            den[g] = den.get(g, 0.0) + anchor.terms[name].ref_sq
        return {g: math.sqrt(num[g] / max(den[g], 1e-30)) for g in sorted(num)}

    def update(self, anchor) -> float | dict[str, float]:
        """One controller step from the drift just measured; returns the weight for the next anchor pass."""
        previous, self.drift = self.drift, self.measure(anchor)
        self.total_drift = self.measure(anchor, "all").get("all", 0.0)
        lo, hi = math.log(self.lam_min), math.log(self.lam_max)
        self.updates += 1
        if self.updates == 1:  # the first pass of a run measures W0 itself (d = round-off): nothing to learn yet
            return self.weight(anchor.terms)
        for g, d in self.drift.items():
            # d exactly as before: the weights did not move since the last pass (a warm-up step at lr 0, a step
            # the finite guard skipped). Its d says nothing about λ; acting on it would loosen λ by e^-(rate+kp)
            # on the round-off d of W0 before training has started.
            if d <= 0 or (g in previous and math.isclose(d, previous[g], rel_tol=1e-9, abs_tol=0.0)):
                continue
            e = max(-1.0, min(1.0, math.log(d / self.budget)))  # clipped log error
            # PI in log λ: the integral moves by rate·e (clamped to the bounds: no wind-up), the proportional
            # part kp·e reacts at once, which damps the overshoot that Adam's momentum lag gives integral control
            self.integral[g] = min(max(self.integral.get(g, math.log(self.lam0)) + self.rate * e, lo), hi)
            self.lam[g] = min(max(math.exp(self.integral[g] + self.kp * e), self.lam_min), self.lam_max)
        return self.weight(anchor.terms)

    def log_values(self) -> dict[str, float]:
        """``rpsft/drift`` (d of the whole block) and ``rpsft/lambda`` (scope=all) or ``rpsft/lambda/<type>``."""
        out = {"rpsft/drift": self.total_drift}
        if self.scope == "all":
            out["rpsft/lambda"] = self.lam.get("all", self.lam0)
            return out
        for g in sorted(self.lam):
            out[f"rpsft/lambda/{g}"] = self.lam[g]
        for g, d in self.drift.items():
            out[f"rpsft/budget_drift/{g}"] = d  # d of the type's block (rpsft/drift/<type> is the per-matrix mean)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"budget": self.budget, "scope": self.scope, "lam": dict(self.lam), "drift": dict(self.drift),
                "total_drift": self.total_drift, "integral": dict(self.integral), "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("scope", self.scope) != self.scope:
            raise ValueError(f"the checkpoint's budget scope is {state.get('scope')!r}, this run's {self.scope!r}")
        self.lam = {g: float(v) for g, v in state["lam"].items()}
        self.drift = {g: float(v) for g, v in state.get("drift", {}).items()}
        self.total_drift = float(state.get("total_drift", 0.0))
        self.integral = {g: float(v) for g, v in state.get("integral", {}).items()}
        self.updates = int(state.get("updates", 0))

    def save(self, directory: str | Path) -> None:
        from .fileio import write_json

        write_json(Path(directory) / STATE_FILE, self.state_dict())

    def load(self, directory: str | Path) -> bool:
        """Restore from a checkpoint directory; False when it holds no budget state (a run started without one)."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True


def weighted_sum(weight: float | Mapping[str, float], sq: Mapping[str, float]) -> float:
    """Σ λ_i·‖A_i‖² for a scalar λ or a per-matrix mapping (the logged ``rpsft/weighted_penalty``)."""
    if isinstance(weight, Mapping):
        return sum(weight[n] * v for n, v in sq.items())
    return float(weight) * sum(sq.values())


class BudgetStateCallback(TrainerCallback):
    """Writes the controller's state into every checkpoint the Trainer saves."""

    def __init__(self, controller: BudgetController):
        self.controller = controller

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            self.controller.save(ckpt)

