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

The hard form (``anchor.budget_form=ball``, :class:`BallBudget`): instead of a penalty, every optimizer step ends
with a projection of the weights back into the ball d ≤ ε (``RotationAnchor.project_ball_``):

    W ← W − U_k (c·A) V_kᵀ,     c = (1 − ε‖σ_k‖ / ‖A‖)₊      (new A = (1 − c)·A, the rest of W untouched)

so d ≤ ε holds after every step by construction, and ε = 0 is the constrained problem (paper Eq. 10): the top-k
block stays at W0. Scope ``all`` takes one c from Σ‖A‖² and Σ‖σ_k‖² of every matrix (the d above), ``type`` one per
matrix type, ``matrix`` one per matrix. There is no λ: the projection replaces the penalty (adapting λ as well would
only drive it to its floor, since the measured d never exceeds ε). The two forms are exclusive.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# the budget keys are checked with the rest of the config (config.py); re-exported here for their callers
from .config import BALL_SCOPES, FORMS, SCOPES, budget_form, check_budget_config  # noqa: F401
from .selection import matrix_type

STATE_FILE = "rpsft_budget.json"


def _check_ball_method(m: Any) -> None:
    """The ball projects Eq. 3's block of dense weights: refuse a method (a ``rpsft.methods.Method``) whose anchor is
    on something else (rpsft_lora: W0 + s·BA) or is not that block (complement)."""
    from .config import ConfigError

    if m is None:
        return
    if m.wrap_anchor is not None:
        raise ConfigError(f"anchor.budget_form=ball projects dense weights, and method={m.name} anchors W0 + s·BA "
                          "through its adapter; use anchor.budget_form=penalty (adaptive λ) with this method")
    if getattr(m, "anchor_form", "block") != "block":
        raise ConfigError(f"anchor.budget_form=ball holds the anchored top-k block, and method={m.name} anchors its "
                          f"{m.anchor_form} instead; use anchor.budget_form=penalty (adaptive λ) with this method")


def check_budget_method(a: Any, run: str, use_anchor: bool, fix: str | None = None, method: Any = None) -> None:
    """A budget needs an anchor to adapt; raise (one line) before the model loads when the run has none, when the
    ball is asked for with a ``method`` (the run's ``rpsft.methods.Method``, resolved by the caller) whose anchor it
    cannot project, or under a launcher that keeps the weights out of reach (DeepSpeed)."""
    from .config import ConfigError

    if a.budget is not None and not use_anchor:
        raise ConfigError(f"anchor.budget={a.budget:g} needs the rotation anchor, and {run} runs without it; "
                          + (fix or "use method=rpsft (or rpsft_lora), set anchor.enabled=true where the method allows it "
                                 "(sft, dft, iw), or drop anchor.budget"))
    if a.budget is not None and budget_form(a) == "ball":
        _check_ball_method(method)
    if a.budget is not None and budget_form(a) == "ball" and \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes"):
        raise ConfigError(BALL_DEEPSPEED)


BALL_DEEPSPEED = ("anchor.budget_form=ball rewrites the weights after each optimizer step, and DeepSpeed keeps the "
                  "weights its optimizer updates (the fp32 masters) inside the optimizer, out of reach; launch with "
                  "FSDP2 (configs/accelerate/fsdp2.yaml) or DDP, or use anchor.budget_form=penalty")


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

    form = "penalty"

    @classmethod
    def from_config(cls, a: Any) -> "BudgetController | None":
        """The controller of ``anchor.budget`` (None without one): a :class:`BallBudget` with budget_form=ball."""
        if a.budget is None:
            return None
        if budget_form(a) == "ball":
            return BallBudget.from_config(a)
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
        return {"form": self.form, "budget": self.budget, "scope": self.scope, "lam": dict(self.lam),
                "drift": dict(self.drift), "total_drift": self.total_drift,
                "drift_over_budget": _ratio(self.total_drift, self.budget), "integral": dict(self.integral),
                "updates": self.updates}

    def load_state_dict(self, state: Mapping) -> None:
        _check_state(self, state)
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


def _ratio(d: float, eps: float) -> float | None:
    """d/ε for run summaries (None at ε = 0, where the ball holds d at round-off)."""
    return d / eps if eps > 0 else None


def _check_state(c: "BudgetController", state: Mapping) -> None:
    if state.get("form", "penalty") != c.form:
        raise ValueError(f"the checkpoint's budget form is {state.get('form', 'penalty')!r}, this run's {c.form!r}")
    if state.get("scope", c.scope) != c.scope:
        raise ValueError(f"the checkpoint's budget scope is {state.get('scope')!r}, this run's {c.scope!r}")


class BallBudget(BudgetController):
    """The hard budget (``anchor.budget_form=ball``): after every optimizer step the anchored blocks are projected
    back into d ≤ ε, one scale c per group (scope ``all``: the whole block; ``type``: a matrix type; ``matrix``:
    each matrix). No λ: :meth:`weight` is 0, so the trainer runs no penalty pass. The trainer calls
    :meth:`project` from ``on_optimizer_step`` on every rank (rpsft.trainer)."""

    form = "ball"

    def __init__(self, budget: float, scope: str = "all"):
        if scope not in BALL_SCOPES:
            raise ValueError(f"ball scope must be one of {BALL_SCOPES}, got {scope!r}")
        if not (math.isfinite(budget) and budget >= 0):
            raise ValueError(f"the ball's radius ε must be a finite relative drift >= 0, got {budget!r}")
        self.budget, self.scope = float(budget), scope
        self.drift: dict[str, float] = {}  # group -> d after the last projection
        self.drift_before: dict[str, float] = {}  # group -> d the last optimizer step left, before the projection
        self.scale: dict[str, float] = {}  # group -> c of the last projection (0: the group was inside the ball)
        self.total_drift = 0.0  # d of every anchored matrix after the last projection (what the weights hold)
        self.total_before = 0.0
        self.by_type: dict[str, float] = {}  # matrix type -> mean relative drift per matrix, after the projection
        self.updates = 0  # projections (one per optimizer step)
        self.projected = 0  # of which moved at least one block
        self._window: list[float] = []  # the largest c of each step since the last log line

    @classmethod
    def from_config(cls, a: Any) -> "BallBudget":
        try:  # the penalty's keys do nothing here; say so when they were set
            defaults = type(a)()
            unused = [k for k in ("lam", "lam_min", "lam_max", "budget_rate", "period", "mode")
                      if getattr(a, k) != getattr(defaults, k)]
        except (TypeError, AttributeError):
            unused = []
        if unused:
            import logging

            logging.getLogger("rpsft").warning(
                "%s: no effect with anchor.budget_form=ball (the projection replaces the penalty; no λ is used)",
                ", ".join(f"anchor.{k}" for k in unused))
        return cls(a.budget, a.budget_scope)

    def group(self, name: str) -> str:
        return name if self.scope == "matrix" else super().group(name)

    def weight(self, names) -> float:
        return 0.0

    def update(self, anchor) -> float:
        return 0.0  # no λ to adapt: the ball acts in project()

    def project(self, anchor, model) -> dict[str, tuple[float, float]]:
        """Project ``model``'s anchored blocks into the ball (one pass, one all-reduce under FSDP2) and record d
        before and after; returns the anchor's per-matrix (‖A‖² before, c)."""
        rows = anchor.project_ball_(model, self.budget, group=None if self.scope == "matrix" else self.group)
        before, after, den = {}, {}, {}
        post = {}
        scale: dict[str, float] = {}
        for name, (sq, c) in rows.items():
            g = self.group(name)
            post[name] = (1.0 - c) ** 2 * max(sq, 0.0)  # A ← (1 − c)·A (the stored weights agree to their rounding)
            before[g] = before.get(g, 0.0) + max(sq, 0.0)
            after[g] = after.get(g, 0.0) + post[name]
            den[g] = den.get(g, 0.0) + anchor.terms[name].ref_sq
            scale[g] = c
        self.drift_before = {g: math.sqrt(before[g] / max(den[g], 1e-30)) for g in sorted(before)}
        self.drift = {g: math.sqrt(after[g] / max(den[g], 1e-30)) for g in sorted(after)}
        self.scale = {g: scale[g] for g in sorted(scale)}
        total = max(sum(den.values()), 1e-30)
        self.total_before = math.sqrt(sum(before.values()) / total)
        self.total_drift = math.sqrt(sum(after.values()) / total)
        self.by_type = anchor.relative_drift_by_type(post)
        self.updates += 1
        self.projected += any(c > 0 for c in scale.values())
        self._window.append(max(scale.values(), default=0.0))
        return rows

    def log_values(self) -> dict[str, float]:
        """``rpsft/drift`` (d after the projection), ``rpsft/drift_before_ball`` (d the step left),
        ``rpsft/ball_scale`` (c, the largest over groups, mean over the steps since the last log line),
        ``rpsft/drift/<type>``, and with scope=type ``rpsft/budget_drift/<type>``."""
        out = {"rpsft/drift": self.total_drift, "rpsft/drift_before_ball": self.total_before,
               "rpsft/ball_scale": sum(self._window) / len(self._window) if self._window else 0.0}
        self._window.clear()
        for t, v in self.by_type.items():
            out[f"rpsft/drift/{t}"] = v
        if self.scope == "type":
            for g, d in self.drift.items():
                out[f"rpsft/budget_drift/{g}"] = d
        return out

    def state_dict(self) -> dict:
        return {"form": self.form, "budget": self.budget, "scope": self.scope, "drift": dict(self.drift),
                "total_drift": self.total_drift, "drift_over_budget": _ratio(self.total_drift, self.budget),
                "drift_before": dict(self.drift_before), "total_drift_before": self.total_before,
                "scale": dict(self.scale), "updates": self.updates, "projected_steps": self.projected}

    def load_state_dict(self, state: Mapping) -> None:
        _check_state(self, state)
        self.drift = {g: float(v) for g, v in state.get("drift", {}).items()}
        self.drift_before = {g: float(v) for g, v in state.get("drift_before", {}).items()}
        self.scale = {g: float(v) for g, v in state.get("scale", {}).items()}
        self.total_drift = float(state.get("total_drift", 0.0))
        self.total_before = float(state.get("total_drift_before", 0.0))
        self.updates = int(state.get("updates", 0))
        self.projected = int(state.get("projected_steps", 0))


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

