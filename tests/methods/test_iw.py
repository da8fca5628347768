"""method=iw: the weight formula (clamp, temperature, masking), the detach decision, the loss on a TRL batch
against a hand computation with an independently loaded reference model, and a short run."""

from __future__ import annotations

import math

import pytest
import torch

from rpsft.config import ConfigError
from rpsft.methods.iw import iw_loss, iw_weights
from rpsft.models import load_model
from rpsft.train import train


def toy():
    # three rows of 4 token slots; row 2 has no completion token at all (fully masked)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    ref = torch.tensor([[-2.0, -1.0, 0, 0], [-3.0, -3.0, -3.0, -3.0], [0, 0, 0, 0]])
    lp = torch.tensor([[-1.5, -0.5, 0, 0], [-0.5, -0.5, 1.0, -3.0], [0, 0, 0, 0]])
    return lp, ref, mask


def test_weight_formula_with_clamp_and_temperature():
    lp, ref, mask = toy()
    # per-row mean log-ratio over completion tokens: 0.5, (2.5 + 2.5 + 4 + 0) / 4 = 2.25, none -> 0
    w = iw_weights(lp, ref, mask, temperature=1.0, w_max=16.0)
    assert w.tolist() == pytest.approx([math.exp(0.5), math.exp(2.25), 1.0], rel=1e-6)
    w = iw_weights(lp, ref, mask, temperature=2.0, w_max=16.0)
    assert w.tolist() == pytest.approx([math.exp(1.0), 16.0, 1.0], rel=1e-6)  # e^4.5 = 90 clamped to w_max
    # masked slots do not count, whatever they hold
    lp2 = lp.clone()
    lp2[0, 2:] = 50.0
    lp2[2] = -7.0
    assert iw_weights(lp2, ref, mask).tolist() == pytest.approx([math.exp(0.5), math.exp(2.25), 1.0], rel=1e-6)


@pytest.mark.numerics
def test_detached_and_undetached_gradients():
    lp0, ref, mask = toy()
    n_items = 6  # completion tokens in the window
    for T, w_max in ((1.0, 16.0), (1.0, 2.0)):  # the second clamps row 1 (e^2.25 = 9.5 > 2)
        lp = lp0.clone().requires_grad_(True)
        loss, w = iw_loss(lp, ref, mask, T, w_max, detach=True, num_items_in_batch=n_items)
        nll = -(lp0 * mask).sum(-1)
        assert loss.item() == pytest.approx(float((w * nll).sum() / n_items))
        loss.backward()
        # detached: a re-weighted SFT gradient, −w_i / N on every completion token, 0 elsewhere
        expect = -(w.detach()[:, None] * mask) / n_items
        torch.testing.assert_close(lp.grad, expect)

        lp = lp0.clone().requires_grad_(True)
        loss, w = iw_loss(lp, ref, mask, T, w_max, detach=False, num_items_in_batch=n_items)
        loss.backward()
        # undetached: −w_i·(1 − T·NLL_i/n_i)/N where unclamped; the clamp has zero derivative
        n_i = mask.sum(-1).clamp(min=1)
        unclamped = (w < w_max).float()
        factor = 1 - unclamped * T * nll / n_i
        torch.testing.assert_close(lp.grad, -(w.detach() * factor)[:, None] * mask / n_items)
    # the sign flip the docs warn about: a sequence with mean token NLL 3 > 1/T, slightly more likely than under ref
    lp = torch.tensor([[-3.0, -3.0]], requires_grad=True)
    loss, _ = iw_loss(lp, torch.full((1, 2), -3.5), torch.ones(1, 2, dtype=torch.bool), detach=False)
    loss.backward()
    assert (lp.grad > 0).all()  # undetached: gradient *descent* lowers log p of a hard demonstration
    lp.grad = None
    loss, _ = iw_loss(lp, torch.full((1, 2), -3.5), torch.ones(1, 2, dtype=torch.bool), detach=True)
    loss.backward()
    assert (lp.grad < 0).all()


@pytest.mark.numerics
def test_trainer_loss_matches_hand_computation_on_a_trl_batch(make_cfg, helpers):
    cfg = make_cfg("iw")
    trainer = helpers.build_trainer(cfg)
    model = trainer.model
    batch = helpers.toy_batch(trainer, n=4)
    # move the model away from its reference: a few SGD steps on this batch's NLL (so weights > 1, and differ)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        lp, mask = helpers.token_log_probs(model, batch)
        (-(lp.sum() / mask.sum())).backward()
        opt.step()

    initial, _ = load_model(cfg.model.name)  # an independent copy of the reference: the initial weights
    with torch.no_grad():
        ref_lp, mask = helpers.token_log_probs(initial, batch)
    model.zero_grad()
    lp, _ = helpers.token_log_probs(model, batch)
    w_raw = torch.exp(((lp - ref_lp) * mask).sum(-1) / mask.sum(-1)).detach()
    assert (w_raw > 1.05).all() and w_raw.max() / w_raw.min() > 1.05
    trainer.iw.w_max = float(w_raw.sort().values[1:3].mean())  # clamps some rows, leaves others
    w = w_raw.clamp(max=trainer.iw.w_max)
    assert (w < w_raw).any() and (w == w_raw).any()
    ref = (w[:, None] * -lp).sum() / mask.sum()
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.train()  # as in the training loop (in eval mode the trainer reports the plain NLL)
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        # two fp32 evaluations of one gradient (TRL's batch path, the hand computation) differ by their sums' round-off:
        # an entry gathers at most K ≈ 10^3 terms (vocabulary 400, the batch's tokens, width 32-48), each sum within
        # γ_K ≈ K·2^-24 ≈ 6e-5 of the size of its terms, here that of the tensor's largest entry. An entry-wise rtol
        # would ask entries near 0 for more than their terms' round-off.
        torch.testing.assert_close(p.grad, g_ref[n], rtol=0, atol=1e-4 * float(g_ref[n].abs().max()), msg=n)
    assert trainer._metrics["train"]["iw/clamped_frac"][-1] == pytest.approx(float((w < w_raw).float().mean()))


def test_iw_trains_with_a_frozen_initial_reference(make_cfg, helpers):
    trainer = helpers.build_trainer(make_cfg("iw", "train.max_steps=3"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "iw/weight_mean" in h]
    assert len(logged) == 3
    assert logged[0]["iw/weight_mean"] == pytest.approx(1.0, abs=1e-6)  # step 1: θ is the reference
    assert abs(logged[-1]["iw/weight_mean"] - 1.0) > 1e-3
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[n], before[n]) for n in before)  # the reference never moved
    assert not all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_iw_run_with_anchor_and_refusals(make_cfg):
    summary = train(make_cfg("iw", "anchor.enabled=true"), progress=False)
    assert summary["global_step"] == 2 and summary["anchor"]["final_penalty"] > 0
    with pytest.raises(ConfigError, match="train.loss_type"):
        train(make_cfg("iw", "train.loss_type=dft", name="x"), progress=False)
    with pytest.raises(ConfigError, match="iw.w_max"):
        train(make_cfg("iw", "iw.w_max=0.5", name="y"), progress=False)


def test_reference_runs_under_the_policys_autocast_with_bf16_mixed_precision(make_cfg, helpers):
    # one process (and DDP): the Trainer runs the policy's forward under accelerate's bf16 autocast, so the
    # reference must run under it too; in fp32 its log-probs differ and w ≠ 1 at the initial weights
    trainer = helpers.build_trainer(make_cfg("iw", "train.bf16=true"))
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
    model = trainer.accelerator.prepare_model(trainer.model)  # the autocast wrap the training loop gives the policy
    model.train()
    seen = []
    hook = trainer.ref_model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, args, out: seen.append(out.dtype))
    trainer.compute_loss(model, helpers.toy_batch(trainer, n=4))
    hook.remove()
    assert seen == [torch.bfloat16]
    assert trainer._metrics["train"]["iw/weight_mean"][-1] == 1.0  # the same computation at the same weights
    assert all(p.dtype == torch.float32 for p in trainer.ref_model.parameters())  # stored like the policy
