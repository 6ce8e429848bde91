"""``lm.CausalLM``: next-token training of any zoo Transformer on the shared trainer.

Logs train/val loss, bits per byte (via the data module's bytes per token), validation perplexity, tokens/s and
MFU (6 N + attention FLOPs per token over the device's datasheet peak; skipped on CPU unless ``peak_flops`` is
given). Routed models add the RL-R REINFORCE loss (reward = the token's log-likelihood, detached, minus a running
mean baseline) and log per-expert load and routing entropy. Everything but the step itself lives in lm.LMModule.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from lm.modules.base import LMModule, check_data_fits, split_batch, token_nll
from zoo.weights.lm import load_lm, resolve_checkpoint

__all__ = ["CausalLM", "check_data_fits", "load_lm", "resolve_checkpoint", "split_batch", "token_nll"]


class CausalLM(LMModule):
    """Next-token language-model training of a zoo Transformer (AdamW, warmup + cosine, routed-model extras).

    Args:
        model: registry name of the Transformer (zoo.available()).
        model_overrides: TransformerConfig fields to override, e.g. ``{n_layers: 2}``.
        **kwargs: the optimisation and logging options of lm.LMModule (lr, weight_decay, warmup_steps, ...).
    """

    uses_train_loss = True

    def __init__(self, model: str = "gemma2-tiny", model_overrides: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.declare_model(model, model_overrides)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Next-token loss (+ REINFORCE for RL-R routers)."""
        _, tokens = split_batch(batch)
        total, metrics = self.compiled_train_loss(tokens)
        for key, value in metrics.items():  # detached tensors: Lightning reads them on the host only when it logs
            self.log(key, value, prog_bar=key == "train/loss")
        self.log_bpb("train", metrics["train/loss"], prog_bar=True)
        return total

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Accumulate summed NLL and token count; log routing statistics."""
        _, tokens = split_batch(batch)
        out, nll = self.run_model(tokens)
        self.routing_loss(out, nll, "val")
        self.accumulate_val(nll)
