"""Dynamic Fine-Tuning (DFT, Wu et al. 2025, arXiv:2508.05629): each token's NLL scaled by its own stop-gradient
probability, L = −(1/N)·Σ_t sg(p_θ(y_t)) · log p_θ(y_t).

We do not re-implement it: TRL's SFTTrainer has it as ``loss_type="dft"`` (trl 1.16, trl/trainer/sft_trainer.py,
``SFTTrainer.compute_loss``: ``per_token_loss = -log_probs * log_probs.exp().detach()``, summed and divided by the
window's token count like the NLL). tests/methods/test_dft.py checks our run's loss and gradient against that
formula on a toy batch. DFT only changes the loss, so it composes with the rotation anchor (anchor.enabled=true).
"""

from . import Method, register

register(Method("dft", "SFT with TRL's DFT loss (token NLL × stop-grad p)", anchor="optional",
                sft_overrides={"loss_type": "dft"}))
