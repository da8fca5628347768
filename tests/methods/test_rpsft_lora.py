"""method=rpsft_lora (Eq. 5): the factored anchor on W0 + s·BA equals the dense anchor on the merged weight, its
closed-form gradient equals autograd, it trains, and it refuses matrices LoRA does not adapt."""

from __future__ import annotations

import copy

import pytest
import torch

from rpsft.anchor import RotationAnchor
from rpsft.fileio import read_jsonl
from rpsft.methods.lora import wrap_lora
from rpsft.methods.rpsft_lora import LoraRotationAnchor
from rpsft.train import train

# low-rank frames on most matrices; full rank on the square q/o (= ‖s·BA‖², no frame stored) and on the non-square
# down_proj (under anchor.full_rank=eq3, which setup() uses unless told: Eq. 3 on its full-rank bases, which leaves the
# part of BA outside W0's row/column space free; under the paper's rule ‖s·BA‖² like q/o)
RANKS = {"q_proj": 1.0, "o_proj": 1.0, "down_proj": 1.0, "*": 4}


def setup(make_cfg, tiny_model_dir, *extra, full_rank_as="eq3"):
    from rpsft.models import load_model

    cfg = make_cfg("rpsft_lora", "lora.r=8", "lora.alpha=24", *extra)  # s = 3
    model, _ = load_model(str(tiny_model_dir))
    dense = RotationAnchor.from_model(model, rank=RANKS, full_rank_as=full_rank_as)
    peft = wrap_lora(model, cfg)
    torch.manual_seed(1)
    for n, p in peft.named_parameters():  # LoRA starts at B = 0; give both factors real values
        if "lora_" in n:
            p.data.normal_(0, 0.3)
    return dense, LoraRotationAnchor.from_dense(dense, peft), peft


def effective(peft):
    """name -> (A, B, s, W0) and the differentiable W0 + s·BA, formed densely (the reference only)."""
    out = {}
    base = peft.get_base_model()
    for name, mod in base.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            s = mod.scaling["default"]
            out[f"{name}.weight"] = mod.get_base_layer().weight.detach() + s * B @ A
    return out


@pytest.mark.numerics
def test_factored_equals_dense_on_the_merged_weight(make_cfg, tiny_model_dir):
    dense, fact, peft = setup(make_cfg, tiny_model_dir)
    assert len(fact) == 14 and sum(t.full for t in fact.terms.values()) == 4
    W = effective(peft)
    with torch.no_grad():
        ref = {n: float(dense._residual(t, W[n]).double().pow(2).sum()) for n, t in dense.terms.items()}
        total = fact.accumulate_grad_(peft, 0.0)  # weight 0: records R without touching .grad
    for n in ref:
        assert fact.last_sq[n] == pytest.approx(ref[n], rel=1e-5), n
        assert ref[n] > 1e-3  # the adapters really moved every anchored matrix
    assert total == pytest.approx(sum(ref.values()), rel=1e-5)
    assert fact.penalty(peft).item() == pytest.approx(total, rel=1e-5)
    # full rank of a square matrix: R = s²‖BA‖² = s²·tr((BᵀB)(AAᵀ)), checked here against the explicit product
    name = "model.layers.1.self_attn.o_proj.weight"
    mod = peft.get_base_model().get_submodule("model.layers.1.self_attn.o_proj")
    BA = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
    assert fact.last_sq[name] == pytest.approx(float((3.0 * BA).pow(2).sum()), rel=1e-5)
    drift = fact.drift(peft)
    assert drift[name]["rel"] == pytest.approx((ref[name] / dense.terms[name].ref_sq) ** 0.5, rel=1e-5)
    down = "model.layers.1.mlp.down_proj.weight"  # 32 × 48 at k = 32: bases, and Eq. 3 < ‖s·BA‖²
    mod = peft.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
    BA = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
    assert not fact.terms[down].full and fact.terms[down].k == 32
    assert fact.last_sq[down] < 0.9 * float((3.0 * BA).pow(2).sum())
    assert set(fact.relative_drift_by_type()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    # memory: frames only; at full rank nothing at all (W0 is LoRA's frozen base)
    assert fact.nbytes == dense.nbytes - sum(t.W0.numel() * 4 for t in dense.terms.values() if t.full)


@pytest.mark.numerics
def test_paper_full_rank_rule_on_lora_is_s2_BA2_on_every_full_rank_matrix(make_cfg, tiny_model_dir):
    # the factored anchor follows the dense anchor's rule: at k = min(m, n) the non-square down_proj is ‖s·BA‖² too
    dense, fact, peft = setup(make_cfg, tiny_model_dir, full_rank_as="l2")
    assert fact.full_rank_as == "l2" and sum(t.full for t in fact.terms.values()) == 6
    fact.accumulate_grad_(peft, 0.0)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        mod = peft.get_base_model().get_submodule(name.removesuffix(".weight"))
        BA = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        assert fact.last_sq[name] == pytest.approx(float((3.0 * BA).pow(2).sum()), rel=1e-5)
    assert fact.nbytes == sum(x.numel() * 4 for t in fact.terms.values() if not t.full for x in t.tensors())
    assert fact.nbytes == dense.nbytes - sum(t.W0.numel() * 4 for t in dense.terms.values() if t.full)


def close(a, b, tol=1e-5):
    """max-abs error within tol of the reference's scale (entry-wise rtol is meaningless for entries near 0)."""
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.mark.numerics
def test_closed_form_gradient_equals_autograd(make_cfg, tiny_model_dir):
    dense, fact, peft = setup(make_cfg, tiny_model_dir)
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}

    def grads():
        g = {n: p.grad.clone() for n, p in lora.items()}
        for p in lora.values():
            p.grad = None
        return g

    # reference: the dense penalty of Eq. 4 on W0 + s·BA, differentiated by autograd through the product
    W = effective(peft)
    sum(dense._residual(t, W[n]).pow(2).sum() for n, t in dense.terms.items()).backward()
    g_dense = grads()
    fact.penalty(peft).backward()
    g_auto = grads()
    for p in lora.values():
        p.grad = torch.full_like(p, 0.5)  # accumulate_grad_ adds to what backward left there
    fact.accumulate_grad_(peft, weight=2.0)
    g_closed = grads()
    for n in lora:
        assert close(g_auto[n], g_dense[n]), n
        assert close(g_closed[n] - 0.5, 2.0 * g_dense[n]), n
    assert max(float(g.abs().max()) for g in g_dense.values()) > 1e-2


def test_names_map_to_peft_parameters_and_bad_setups_are_refused(make_cfg, tiny_model_dir):
    dense, fact, peft = setup(make_cfg, tiny_model_dir)
    names = fact.peft_names(peft)
    base_name, a_name, b_name = names["model.layers.0.self_attn.q_proj.weight"]
    assert base_name == "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert (a_name, b_name) == (base_name.replace("base_layer", "lora_A.default"),
                                base_name.replace("base_layer", "lora_B.default"))
    # a frame taken from other weights than the ones LoRA wraps
    other = copy.deepcopy(peft)
    other.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.data.add_(0.1)
    with pytest.raises(ValueError, match="q_proj.weight: the LoRA base weight is not the weight"):
        LoraRotationAnchor.from_dense(dense, other)
    # an anchored matrix that LoRA leaves frozen
    with pytest.raises(ValueError, match="not adapted by LoRA.*lora.targets"):
        train(make_cfg("rpsft_lora", "lora.targets=q_proj,v_proj", name="t"), progress=False)
    with pytest.raises(ValueError, match="defined by its anchor"):
        train(make_cfg("rpsft_lora", "anchor.enabled=false", name="u"), progress=False)


def test_rpsft_lora_trains_and_the_anchor_holds_the_frame(make_cfg, tiny_model_dir):
    from peft import PeftModel

    from rpsft.models import load_model

    common = ("train.max_steps=8", "train.lr=1e-2", "anchor.lam=100")
    anchored = train(make_cfg("rpsft_lora", *common), progress=False)
    plain_cfg = make_cfg("lora", *common)
    train(plain_cfg, progress=False)
    rows = [r for r in read_jsonl(f"{anchored['output_dir']}/metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and rows[0]["rpsft/penalty"] == 0.0 < rows[-1]["rpsft/penalty"]  # B = 0 at step 1
    assert "rpsft/drift/q_proj" in rows[-1]
    # the same anchor measured on the unanchored LoRA run: without λR the frame drifts much further
    initial, _ = load_model(str(tiny_model_dir))
    frame = LoraRotationAnchor.from_dense(RotationAnchor.from_model(initial, rank=4),
                                          PeftModel.from_pretrained(initial, plain_cfg.output_dir))
    free = frame.penalty(PeftModel.from_pretrained(load_model(str(tiny_model_dir))[0], plain_cfg.output_dir)).item()
    assert anchored["anchor"]["final_penalty"] < 0.2 * free  # measured: 0.024 vs 0.82
