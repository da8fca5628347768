"""``rpsft rl``: DAPO (arXiv 2503.14476) from an SFT checkpoint, on TRL's ``GRPOTrainer`` (paper §5.2, Tables 3-4).

The objective is DAPO's Eq. 1: token-level clipped surrogate with clip-higher (ε_low = 0.2, ε_high = 0.28), no KL
term (β = 0, so no reference model is loaded), token-mean over the whole accumulated batch (TRL
``loss_type="dapo"``), truncated completions masked out of the loss (``mask_truncated_completions``), G samples per
prompt at T = 1. What TRL does not provide is added here, each piece small and tested:

* rewards (:mod:`rpsft.rl.rewards`): +1/−1 from the evaluation harness's math judge + TRL's soft overlong
  punishment;
* dynamic sampling (:mod:`rpsft.rl.sampling` + :class:`rpsft.rl.trainer.DAPOTrainer`): groups whose G answers are
  all right or all wrong are dropped and the batch is refilled with freshly generated groups (DAPO Eq. 11);
* optionally the RPSFT rotation anchor (``--set anchor.enabled=true``) through :class:`rpsft.trainer.AnchorMixin`,
  exactly as in ``rpsft train``; off by default, as in the paper's RL runs.

Modules: ``config`` (:class:`RLConfig`, YAML + ``--set``), ``data`` (prompts through the evaluation loader),
``trainer`` (DAPOTrainer, GRPOConfig; imports torch and TRL), ``run`` (:func:`run_rl`), ``cli`` (the ``rl``
command). Importing this package stays cheap: torch and TRL load with ``rpsft.rl.trainer``.
"""

from __future__ import annotations

from .config import RLConfig, load_rl_config, validate_rl
from .data import load_prompts
from .run import run_rl

__all__ = ["RLConfig", "load_prompts", "load_rl_config", "run_rl", "validate_rl"]
