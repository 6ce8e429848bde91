"""``lm.CausalLM``: next-token training of any zoo Transformer on the shared trainer.

Logs train/val loss, bits per byte (via the data module's bytes per token), validation perplexity, tokens/s and
MFU (6 N + attention FLOPs per token over the device's datasheet peak; skipped on CPU unless ``peak_flops`` is
given). Routed models add the RL-R REINFORCE loss (reward = the token's log-likelihood, detached, minus a running
mean baseline) and log per-expert load and routing entropy.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo
from lm.metrics import bits_per_byte, flops_per_token, matmul_params, mfu, peak_flops
from lm.optim import check_optim_args, lr_at, make_adamw, param_groups
from zoo.models.attention import attention_flops_per_token
from zoo.models.routing import reinforce_loss, routed_layers


def split_batch(batch: Tensor | tuple | list) -> tuple[Tensor | None, Tensor]:
    """(window indices or None, tokens [B, T+1]) from a TextDataModule batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return None, batch


def token_nll(model: nn.Module, tokens: Tensor) -> Tensor:
    """Per-token negative log-likelihood [B, T] of tokens[:, 1:] given tokens[:, :-1] (float32)."""
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none").view_as(targets)


def check_data_fits(model_name: str, config: Any, vocab_size: int | None, seq_len: int | None,
                    tokenizer: str | None = None) -> None:
    """Raise a ValueError naming the value when a tokenizer or sequence length does not fit the model."""
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has vocab_size={vocab_size} but model {model_name!r} has "
                         f"vocab_size={config.vocab_size}; use the model's tokenizer or set "
                         f"model_overrides: {{vocab_size: {vocab_size}}}")
    if seq_len is not None and seq_len > config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model {model_name!r}'s max_seq_len={config.max_seq_len}; "
                         f"lower data.seq_len or set model_overrides: {{max_seq_len: {seq_len}}}")


class CausalLM(L.LightningModule):
    """Next-token language-model training of a zoo Transformer (AdamW, warmup + cosine, routed-model extras)."""

    def __init__(self, model: str = "gemma2-tiny", model_overrides: dict[str, Any] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 100,
                 total_steps: int | None = None, min_lr_ratio: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, reinforce_weight: float = 1.0,
                 baseline_momentum: float = 0.9, balance_weight: float = 0.0, peak_flops: float | None = None,
                 throughput_every: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._init_common(model, model_overrides)

    def _init_common(self, model: str, overrides: dict[str, Any] | None) -> None:
        """Build the trained model and the state shared with lm.Distill (which trains its student the same way)."""
        check_optim_args(self.hparams)
        self.model_name = model
        self.model = zoo.create(model, **(overrides or {}))
        if not hasattr(self.model, "config"):
            raise ValueError(f"model {model!r} is not a zoo language model (it has no .config); "
                             "pick one of the Transformer names in zoo.available()")
        # Running mean of the REINFORCE reward, seeded by the first batch's mean (flag = 0 until then) rather
        # than an arbitrary constant. Buffers, so a resumed run keeps them.
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("reward_baseline_set", torch.zeros(()))
        self.bytes_per_token: dict[str, float] = {}
        self._flops_per_token: float | None = None
        self._tok_count = 0
        self._tok_mark: float | None = None
        self._val_sum = torch.zeros(())
        self._val_n = torch.zeros(())

    @property
    def config(self) -> Any:
        """The Transformer's config."""
        return self.model.config

    # -- data checks ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the data module's tokenizer and seq_len against the model; read its bytes per token."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        vocab = dm.vocab_size if hasattr(dm, "vocab_size") else None
        check_data_fits(self.model_name, self.config, vocab, getattr(dm, "seq_len", None),
                        getattr(dm, "tokenizer_spec", None))
        if hasattr(dm, "bytes_per_token"):
            if getattr(dm, "meta", None) is None:
                dm.setup(stage)
            self.bytes_per_token = {s: dm.bytes_per_token(s) for s in ("train", "val")}

    # -- steps ---------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [B, T, V]."""
        return self.model(input_ids)

    def _routing_loss_and_logs(self, nll: Tensor, stage: str) -> Tensor:
        """Weighted RL-R losses (REINFORCE with reward = token log-likelihood minus a running mean, plus load
        balancing) to add to the training loss; logs per-expert load and routing entropy."""
        layers = routed_layers(self.model)
        rl = balance = nll.new_zeros(())
        if not layers:
            return rl
        reward = -nll.detach()
        # The baseline includes this batch: while the loss falls fast, a lagging mean would make every advantage
        # positive and reinforce whichever expert happened to be picked (routing collapse).
        # torch.where, not `if`: no host-device sync per step on GPU.
        m = self.hparams.baseline_momentum
        mean = reward.mean()
        base = torch.where(self.reward_baseline_set > 0, m * self.reward_baseline + (1 - m) * mean, mean)
        used_rl = False
        for i, layer in enumerate(layers):
            stats = layer.last_stats
            load = stats.get("load")
            if load is not None:
                if load.numel() <= 16:
                    for e in range(load.numel()):
                        self.log(f"{stage}/route{i}/load_e{e}", load[e])
                else:  # many experts: the extremes say whether routing is balanced
                    self.log(f"{stage}/route{i}/load_max", load.max())
                    self.log(f"{stage}/route{i}/load_min", load.min())
            for key in ("load_entropy", "router_entropy"):
                if key in stats:
                    self.log(f"{stage}/route{i}/{key}", stats[key])
            if stage == "train" and layer.last_log_prob is not None:
                rl = rl + reinforce_loss(layer.last_log_prob, reward, base)
                used_rl = True
            if stage == "train" and layer.last_aux_loss is not None:
                balance = balance + layer.last_aux_loss
                self.log(f"train/route{i}/balance_loss", layer.last_aux_loss)
        if used_rl:
            self.reward_baseline.copy_(base)
            self.reward_baseline_set.fill_(1.0)
            self.log("train/reinforce_loss", rl)
            self.log("train/reward_baseline", self.reward_baseline)
        return self.hparams.reinforce_weight * rl + self.hparams.balance_weight * balance

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Next-token loss (+ REINFORCE for RL-R routers)."""
        _, tokens = split_batch(batch)
        nll = token_nll(self.model, tokens)
        loss = nll.mean()
        routing = self._routing_loss_and_logs(nll, "train")
        self.log("train/loss", loss, prog_bar=True)
        if "train" in self.bytes_per_token:
            self.log("train/bpb", bits_per_byte(loss.detach(), self.bytes_per_token["train"]), prog_bar=True)
        return loss + routing

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Throughput and MFU over the last ``throughput_every`` steps (first window skipped: warm-up)."""
        _, tokens = split_batch(batch)
        b, t1 = tokens.shape
        if self._flops_per_token is None:
            c = self.config
            self._flops_per_token = flops_per_token(matmul_params(self.model, c.vocab_size),
                                                    attention_flops_per_token(c.n_layers, c.n_heads, c.head_dim,
                                                                              t1 - 1))
        self._tok_count += b * (t1 - 1) * self.trainer.world_size
        if (batch_idx + 1) % self.hparams.throughput_every:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only at window ends: per-step syncs would slow training
        now = time.perf_counter()
        if self._tok_mark is not None:
            rate = self._tok_count / max(now - self._tok_mark, 1e-9)
            self.log("perf/tokens_per_s", rate)
            peak = self.hparams.peak_flops or peak_flops(self.device)
            util = mfu(self._flops_per_token, rate, peak, self.trainer.world_size)
            if util is not None:
                self.log("perf/mfu", util)
        self._tok_mark, self._tok_count = now, 0

    def on_train_epoch_start(self) -> None:
        """Restart the throughput window so evaluation time is not counted as training time."""
        self._tok_mark, self._tok_count = None, 0

    def on_validation_epoch_start(self) -> None:
        """Reset the token-weighted validation sums."""
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_n = torch.zeros((), device=self.device, dtype=torch.float64)
        self._tok_mark = None  # validation pauses training: next throughput window starts fresh

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Accumulate summed NLL and token count (exact token-weighted mean, not a mean of batch means)."""
        _, tokens = split_batch(batch)
        nll = token_nll(self.model, tokens)
        self._routing_loss_and_logs(nll, "val")
        self._val_sum += nll.double().sum()
        self._val_n += nll.numel()

    def on_validation_epoch_end(self) -> None:
        """Log val/loss, val/ppl and val/bpb from the summed NLL across all ranks."""
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        n = self.trainer.strategy.reduce(self._val_n, reduce_op="sum")
        if float(n) == 0:
            return
        loss = (total / n).float()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))
        if "val" in self.bytes_per_token:
            self.log("val/bpb", bits_per_byte(loss, self.bytes_per_token["val"]), prog_bar=True)

    # -- optimiser -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        """AdamW (no decay on norms/biases/embeddings) with per-step warmup + cosine to min_lr_ratio of peak."""
        hp = self.hparams
        opt = make_adamw(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=hp.betas, eps=hp.eps)
        total = hp.total_steps or int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == math.inf:
            raise ValueError("cannot size the cosine schedule: set trainer.max_steps or model total_steps")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, 1.0, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------------------------
# Loading a trained model by name or checkpoint (evals, distillation teachers)
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> str:
    """A .ckpt file as given, or the one a run folder holds: its last.ckpt, else the newest *.ckpt inside."""
    if os.path.isdir(path):
        found = sorted(Path(path).rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
        if not found:
            raise FileNotFoundError(f"no .ckpt file under {path!r}; train the model first "
                                    "(e.g. `zoo fit --config configs/lm/stdlib_gemma2_tiny.yaml`)")
        return str(found[-1])
    return path


def load_lm(spec: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """A zoo Transformer from a registry name (random init), a CausalLM / Distill .ckpt, or a run folder."""
    if not (spec.endswith(".ckpt") or os.path.sep in spec or os.path.exists(spec)):
        return zoo.create(spec)
    spec = resolve_checkpoint(spec)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist; train one with `zoo fit --config ...` "
                                "or pass a model name from zoo.available()")
    from zoo.weights.safe_load import safe_torch_load

    # The project's one safe reader: truncated, empty and hostile files give one clear error naming the file.
    ckpt = safe_torch_load(spec, map_location=map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"checkpoint {spec!r} has no 'state_dict' (got {type(ckpt).__name__}); it was not written "
                         "by this project's language-model trainer")
    hp = ckpt.get("hyper_parameters") or {}
    if "student" in hp:  # a Distill checkpoint: the student is the trained model
        name, overrides = hp["student"], hp.get("student_overrides")
    elif "model" in hp:
        name, overrides = hp["model"], hp.get("model_overrides")
    else:
        raise ValueError(f"checkpoint {spec!r} has no lm.CausalLM or lm.Distill hyper-parameters; "
                         "it was not written by this project's language-model trainer")
    model = zoo.create(name, **(overrides or {}))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model.eval()
