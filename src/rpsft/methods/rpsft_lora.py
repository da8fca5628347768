"""RPSFT on LoRA (Eq. 5): the rotation anchor on the effective weight W = W0 + s·BA, never forming BA.

LoRA freezes W0, and W0 is the matrix the anchor's frame comes from, so U_kᵀW0V_k = diag σ_k and

    A_k = U_kᵀ (W0 + s·BA) V_k − diag σ_k = s·(U_kᵀB)(AV_k) = s·P Q,     P = U_kᵀB (k×r),  Q = AV_k (r×k)
    R   = ‖s·P Q‖²_F = s²·⟨PᵀP, QQᵀ⟩_F                                  (two r×r Gram matrices, no k×k block)
    ∂R/∂B = U_k · 2s²·P(QQᵀ),      ∂R/∂A = 2s²·(PᵀP)Q · V_kᵀ

— 2(m+n)·k·r + O(k·r²) multiply-adds per matrix and step, against ≈ m·n·(r + 4k) for the dense form on W0 + s·BA
(benchmarks/lora_anchor.py measures the ratio). Where the dense anchor keeps W0 instead of a frame — k = min(m, n)
under the paper's full-rank rule (App. C.2, Eq. 11; ``anchor.full_rank=l2``, the default), square or not —
R = ‖s·BA‖² = s²·tr((BᵀB)(AAᵀ)): the same formula with P = B, Q = A, and no copy of W0 at all. With
``anchor.full_rank=eq3`` a non-square matrix at k = min(m, n) keeps its frame and the factored Eq. 3, like the dense
anchor.

The identity U_kᵀW0V_k = diag σ_k is checked once when the anchor is built (``check=True``), so a frame taken from
other weights than the ones LoRA wraps fails loudly instead of silently anchoring the wrong thing.

With bf16/fp16 lean frames (``anchor.frame_dtype``, rpsft.frames) the dense anchor subtracts A_ref = U_lᵀW0V_l
instead of diag σ_k, and the same algebra gives U_lᵀ(W0 + s·BA)V_l − A_ref = s·(U_lᵀB)(AV_l) exactly: the factored
form needs no A_ref at all, only the rounded frames (upcast one matrix at a time), and the build check above
measures the residual against A_ref.

Under FSDP2 the factors are row shards (B's rows of m, A's rows of r): P = U_kᵀB = Σ_r U_rᵀB_r is summed over B's
shards like the dense anchor's block (rpsft.distributed), Q is assembled from each rank's rows by the same single
all-reduce, and each rank keeps only its rows of U_k and adds its rows of the gradient (``_products``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, register
from ._peft import export_merged
from ..anchor import AnchorTerms, weight_of
from ..distributed import all_reduce_sum_, is_dtensor, row_shard
from .lora import wrap_lora
from ..placement import canonical_modules, host_values
from ..selection import module_name


@dataclass
class _LoraTerm:
    name: str  # the dense parameter name, e.g. model.layers.0.self_attn.q_proj.weight (drift logs by type)
    shape: tuple[int, int]
    k: int
    U: torch.Tensor | None  # m×k, None at full rank
    S: torch.Tensor | None  # k
    V: torch.Tensor | None  # n×k
    ref_sq: float  # ‖σ_k‖² or ‖W0‖², the scale of relative drift (same as the dense anchor)
    row0: int | None = None  # set once U has been cut to the rows of an FSDP2 shard of lora_B starting at this row

    @property
    def full(self) -> bool:
        return self.U is None

    @property
    def module(self) -> str:
        return module_name(self.name)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.U, self.S, self.V) if t is not None]

    def frames(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.U.to(dtype), self.V.to(dtype)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LoraRotationAnchor(AnchorTerms):
    """Same interface as :class:`rpsft.anchor.RotationAnchor`, on W0 + s·BA of a PEFT LoRA model (Eq. 5)."""

    terms: dict[str, _LoraTerm]

    def __init__(self, terms, adapter: str = "default", dtype: torch.dtype = torch.float32,
                 full_rank_as: str = "l2"):
        super().__init__(terms, dtype, full_rank_as=full_rank_as)
        self.adapter = adapter

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, dense, model: torch.nn.Module, adapter: str = "default", check: bool = True,
                   tol: float = 1e-4) -> "LoraRotationAnchor":
        """Reuse the frames (U_k, σ_k, V_k) of a dense ``RotationAnchor`` built on the model before LoRA wrapped it;
        a dense term that kept W0 (its block is all of ΔW: full rank under the dense anchor's rule) becomes ‖s·BA‖²."""
        if dense.form != "block":
            raise ValueError(f"the factored LoRA anchor is Eq. 3's block only; got a {dense.form!r} anchor")
        terms = []
        for name, t in dense.terms.items():
            terms.append(_LoraTerm(name, t.shape, t.k, t.U, t.S, t.V, t.ref_sq))
        anchor = cls(terms, adapter=adapter, dtype=dense.dtype, full_rank_as=dense.full_rank_as)
        layers = anchor._layers(model)  # fails early, naming the matrix, if one is not LoRA-adapted
        if check:
            with torch.no_grad():
                for name, t in dense.terms.items():
                    W0 = layers[name][0].weight.detach().to(dense.dtype)
                    # the residual of the frozen part; it must be round-off for the factored form to be exact
                    C = W0 - t.W0 if t.full else dense._residual(t, W0)
                    rel = float(C.double().norm()) / max(t.ref_sq, 1e-30) ** 0.5
                    if rel > tol:
                        raise ValueError(
                            f"{name}: the LoRA base weight is not the weight the anchor was built from "
                            f"(‖U_kᵀW0V_k − diag σ_k‖/‖σ_k‖ = {rel:.2e} > {tol:g}); build the dense anchor on the "
                            "model before wrapping it with LoRA, from the same checkpoint")
        return anchor

    def _repr_extra(self) -> str:
        return f"adapter={self.adapter!r}, "

    def _layers(self, model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.nn.Parameter,
                                                                    torch.nn.Parameter, float]]:
        """dense name -> (base layer, lora_A weight (r×n), lora_B weight (m×r), scaling s)."""
        from peft.tuners.lora import LoraLayer

        modules = canonical_modules(_base(model))  # names without checkpoint / compile wrapper components
        out = {}
        for name, t in self.terms.items():
            layer = modules.get(t.module)
            if not isinstance(layer, LoraLayer) or self.adapter not in layer.lora_A:
                raise ValueError(
                    f"anchor matrix {name} is not adapted by LoRA adapter {self.adapter!r}: its weight is frozen, so "
                    "anchoring it would be a constant. Make anchor.targets a subset of lora.targets (or add the "
                    "module to lora.targets)")
            if layer.use_dora.get(self.adapter, False) or getattr(layer, "fan_in_fan_out", False):
                raise ValueError(f"{name}: DoRA / fan_in_fan_out LoRA layers change the effective weight; the "
                                 "factored anchor supports plain LoRA only")
            A, B = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            if (B.shape[0], A.shape[1]) != t.shape:
                raise ValueError(f"anchor matrix {name} has shape {t.shape} but its LoRA factors give "
                                 f"{(B.shape[0], A.shape[1])}")
            out[name] = (layer.get_base_layer(), A, B, float(layer.scaling[self.adapter]))
        return out

    def peft_names(self, model: torch.nn.Module) -> dict[str, tuple[str, str, str]]:
        """dense name -> the PEFT parameter names (``…base_layer.weight``, ``…lora_A.<a>.weight``, ``…lora_B…``)."""
        ids = {id(p): n for n, p in model.named_parameters()}
        return {name: (ids[id(base.weight)], ids[id(A)], ids[id(B)])
                for name, (base, A, B, _) in self._layers(model).items()}

    # ------------------------------------------------------------------ the math
    def _factors(self, t: _LoraTerm, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P = U_kᵀB (k×r) and Q = AV_k (r×k); at full rank P = B, Q = A."""
        self._place(t, A.device)  # built on the CPU; the Trainer moves the model afterwards
        A, B = A.to(self.dtype), B.to(self.dtype)
        if t.full:
            return B, A
        U, V = t.frames(self.dtype)  # bf16/fp16 lean frames: upcast for this matrix only
        return U.T @ B, A @ V

    def penalty(self, model: torch.nn.Module, record: bool = False,
                weight: dict[str, float] | None = None) -> torch.Tensor:
        """R = Σ s²·⟨PᵀP, QQᵀ⟩ as a differentiable scalar (autograd path; training uses accumulate_grad_).
        ``record`` and ``weight`` as in ``RotationAnchor.penalty``."""
        total = torch.zeros((), dtype=self.dtype)
        if record:
            self.last_sq = {}
        for name, (_, A, B, s) in self._layers(model).items():
            if is_dtensor(A) or is_dtensor(B):
                raise NotImplementedError("penalty() is the autograd path for unsharded LoRA factors; under FSDP2 "
                                          "use accumulate_grad_ (closed form, returns R) or drift()")
            P, Q = self._factors(self.terms[name], A, B)
            r = (s * s) * ((P.T @ P) * (Q @ Q.T)).sum()
            if record:
                self.last_sq[name] = float(r.detach())
            total = total.to(P.device) + (r if weight is None else r * weight[name])
        return total

    @staticmethod
    def _cut(t: _LoraTerm, row0: int, rows: int) -> None:
        """Keep only the rows of U_k that meet this rank's rows of lora_B (FSDP2 Shard(0)), once, freeing the rest."""
        if t.full:
            return
        if t.row0 is None:
            t.U = t.U[row0:row0 + rows].contiguous()
            t.row0 = row0
        elif t.row0 != row0 or t.U.shape[0] != rows:
            raise RuntimeError(f"{t.name}: the LoRA factors were re-sharded after the anchor was cut to its rows; "
                               "build the anchor again after changing the sharding")

    @torch.no_grad()
    def _products(self, model: torch.nn.Module) -> list[tuple]:
        """Per matrix (term, lora_A, lora_B, s, P, Q, this rank's rows of A, this rank's rows of B), in self.dtype,
        with P = U_kᵀB (k×r) — at full rank, where P = B is m×r, its Gram BᵀB (r×r) instead — and Q = AV_k (r×k;
        A itself at full rank).

        Under FSDP2 each rank holds rows of B (of m) and rows of A (of r). P is a sum over B's row shards,
        U_kᵀB = Σ_r U_rᵀB_r (BᵀB = Σ_r B_rᵀB_r), like the dense anchor's U_kᵀWV_k (distributed.py); Q's rows are
        split across ranks, so each rank writes its rows into a zero r×k (r×n) block and the same sum assembles
        it. One all-reduce for every matrix; U_k is cut to this rank's rows of B on first use."""
        out, partial, group = [], [], None
        for name, (_, A, B, s) in self._layers(model).items():
            t = self.terms[name]
            sharded = is_dtensor(A) or is_dtensor(B)
            if sharded:
                Bl, b0, group = row_shard(B)
                Al, a0, _ = row_shard(A)
                self._cut(t, b0, Bl.shape[0])
            else:
                Bl, Al, a0 = B, A, 0
            self._place(t, Bl.device)  # after the cut: only this rank's rows of U_k move
            Bl, Al = Bl.detach().to(self.dtype), Al.detach().to(self.dtype)
            rows = slice(a0, a0 + Al.shape[0])
            if t.full:
                P, Qr = Bl.T @ Bl, Al
            else:
                U, V = t.frames(self.dtype)  # bf16/fp16 lean frames: upcast for this matrix only
                P, Qr = U.T @ Bl, Al @ V
            if sharded:
                Q = Qr.new_zeros((A.shape[0], Qr.shape[1]))
                Q[rows] = Qr
                partial += [P, Q]
            else:
                Q = Qr
            out.append((t, A, B, s, P, Q, rows, Bl))
        all_reduce_sum_(partial, group)  # in place: P and Q are now the whole matrices' (no-op unsharded)
        return out

    @torch.no_grad()
    def accumulate_grad_(self, model: torch.nn.Module, weight: float | dict[str, float] = 1.0) -> float:
        """Add ``weight · ∇R`` to lora_A / lora_B ``.grad`` in closed form; return R (unweighted). Under FSDP2 each
        rank adds its rows, U_r·dP and (dQ)_rows·V_kᵀ, to its own gradient shards."""
        sq = []
        for t, A, B, s, P, Q, rows, Bl in self._products(model):
            GP, GQ = (P if t.full else P.T @ P), Q @ Q.T  # r×r
            sq.append((s * s) * (GP * GQ).sum())
            c = 2 * s * s
            if t.full:  # dR/dB = 2s²·B(AAᵀ), dR/dA = 2s²·(BᵀB)A
                dB, dA = c * (Bl @ GQ), c * (GP[rows] @ Q)
            else:  # dR/dB = U_k·2s²·P(QQᵀ), dR/dA = 2s²·(PᵀP)Q·V_kᵀ
                U, V = t.frames(self.dtype)
                dB, dA = U @ (c * (P @ GQ)), (c * (GP[rows] @ Q)) @ V.T
            for p, g in ((A, dA), (B, dB)):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad
                grad.add_(g.to(grad.dtype), alpha=weight_of(weight, t.name))
        if not sq:
            self.last_sq = {}
            return 0.0
        values = host_values(torch.stack(sq))  # one device sync per step
        self.last_sq = dict(zip(self.terms, values))
        return float(sum(values))

    @torch.no_grad()
    def drift(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Per matrix: ``abs`` = ‖s·PQ‖_F, ``rel`` = abs / ‖σ_k‖ (‖s·BA‖/‖W0‖ at full rank), ``k``, ``type``;
        FSDP2 shards too (every rank takes part in the one all-reduce)."""
        sq = [((s * s) * ((P if t.full else P.T @ P) * (Q @ Q.T)).sum()).clamp(min=0)  # ‖s·PQ‖² from two r×r Grams
              for t, _, _, s, P, Q, _, _ in self._products(model)]
        values = host_values(torch.stack(sq)) if sq else []  # one sync for all matrices
        return {name: self._drift_row(name, v) for name, v in zip(self.terms, values)}


def wrap_anchor(dense, model, cfg) -> LoraRotationAnchor:
    return LoraRotationAnchor.from_dense(dense, model)


def finalize(trainer, cfg, out_dir) -> dict:
    return export_merged(trainer, cfg, out_dir, enabled=cfg.lora.merge)


register(Method(
    "rpsft_lora", "LoRA + rotation anchor on the effective weight W0 + s·BA (Eq. 5), factored",
    anchor="on", prepare_model=lambda model, cfg: wrap_lora(model, cfg, "rpsft_lora"), wrap_anchor=wrap_anchor,
    finalize=finalize, plain="lora",
    extra_memory="LoRA adapters + (m+n+1)·k fp32 numbers per anchored matrix (nothing where k reaches min(m, n): "
                 "‖s·BA‖², W0 is LoRA's base; with anchor.full_rank=eq3 a non-square one keeps its bases)",
))
