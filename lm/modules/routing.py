"""Training losses of routed language models (Clark et al. 2022): the RL-R router's REINFORCE surrogate.

The routed layer itself (zoo.models.routing) only reports what it did (``RoutingAux``: chosen experts, their
log-probabilities, the balancing term); turning that into a loss is the trainer's business, here.
"""
from __future__ import annotations

from torch import Tensor


def reinforce_loss(log_prob: Tensor, reward: Tensor, baseline: Tensor | float) -> Tensor:
    """REINFORCE surrogate: -mean((reward - baseline) * log_prob); reward is detached (it is not a gradient path)."""
    advantage = (reward.detach() - baseline).to(log_prob.dtype)
    return -(advantage * log_prob).mean()
