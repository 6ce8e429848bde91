"""``lm.LMModule``: what every language-model LightningModule shares; ``CausalLM`` and ``Distill`` are siblings on it.

The base owns the optimisation options (AdamW, warmup + cosine), the trained model's name and overrides, the routed
model's REINFORCE / balancing losses, throughput and MFU, the token-weighted validation loss and the checkpoint
contract. A subclass names its model (``declare_model``) and writes its own ``training_step``.

The model is built in ``configure_model`` (the hook Lightning calls inside the strategy's init context, so a sharded
strategy can build it on the meta device), guarded so a second call is a no-op. Everything that needs the model
(``forward``, ``configure_optimizers``, checkpoint loading) calls it first, so plain-Python use works too. The
config is known from ``__init__`` on: it comes from a meta-device build, which costs no memory and checks the name
and overrides before any training.
"""
from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import zoo
from lm.modules.metrics import bits_per_byte
from lm.modules.optim import check_optim_args, lr_at, make_adamw, param_groups
from lm.modules.routing import reinforce_loss
from lm.parallel.flops import mfu_flops_per_token
from lm.parallel.hardware import mfu, peak_flops
from lm.parallel.sharding import STRATEGY_NAME, apply_activation_checkpointing, build_sharded  # registers fsdp2
from zoo.models.lm_blocks import ROUTED
from zoo.models.transformer import TransformerOutput
from zoo.weights.checkpoint import CONTRACT_KEY, CONTRACT_VERSION
from zoo.weights.lm import CHECKPOINT_KIND

# Defaults of the RL-R knobs, applied only when the model has an RL-R router (set elsewhere, they are an error).
REINFORCE_WEIGHT, BASELINE_MOMENTUM = 1.0, 0.9


def split_batch(batch: Tensor | tuple | list) -> tuple[Tensor | None, Tensor]:
    """(window indices or None, tokens [B, T+1]) from a TextDataModule batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return None, batch


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood [B, T] of targets [B, T] under logits [B, T, V] (float32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none").view_as(targets)


def chunked_token_nll(head: Any, hidden: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """token_nll of ``head(hidden)`` [B, T, V] computed chunk_size tokens at a time; equal to the full loss.

    ``head`` maps final-norm hidden states [N, D] to logits [N, V] (unembedding + soft-cap, e.g.
    ``Transformer.logits``). Each chunk runs under activation checkpointing, so neither the forward nor the
    backward ever holds more than one chunk's [chunk_size, V] logits: the backward recomputes them per chunk
    (one extra unembedding matmul) instead of keeping B*T*V floats alive.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per loss chunk)")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = [checkpoint(_chunk_nll, head, h, t, use_reentrant=False)
             for h, t in zip(flat_h.split(chunk_size), flat_t.split(chunk_size))]
    return torch.cat(parts).view_as(targets)


def _chunk_nll(head: Any, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


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


class LMModule(L.LightningModule):
    """Base of the LM LightningModules: AdamW with warmup + cosine, routed-model losses, throughput/MFU, validation.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW decay of matrices (not norms, biases, embeddings).
        warmup_steps: linear warmup steps.
        total_steps: cosine length (None: the Trainer's estimate of the run's steps).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        betas: AdamW's moment decay rates.
        eps: AdamW's denominator epsilon.
        reinforce_weight: weight of the RL-R router's REINFORCE loss (None: 1.0); only for ``router: rlr``.
        baseline_momentum: momentum of the REINFORCE reward baseline (None: 0.9); only for ``router: rlr``.
        balance_weight: weight of the RL-R router's load-balancing loss; only for ``router: rlr``.
        peak_flops: device peak FLOP/s for MFU (None: the datasheet value of known GPUs; no MFU on CPU).
        throughput_every: steps per tokens/s and MFU measurement window.
        loss_chunk_size: training loss computed this many tokens at a time, so the [B, T, vocab] logits never
            exist at once (0: off, full logits). Evaluation keeps full logits.
        compile: run the training loss (forward, chunked loss, routing losses; backward follows through
            AOTAutograd) as one ``torch.compile(fullgraph=True)`` graph.
        activation_checkpointing: recompute each Transformer block's activations in backward (less memory, ~1/3
            more compute); with or without sharding.
        mixed_precision: under ``--trainer.strategy fsdp2``, bf16 parameters and compute with fp32 gradient
            reduction (None: on GPU only; CPU runs stay fp32).
    """

    # Logged metrics worth a line in the end-of-run summary (read by the trainer's summary printer).
    # perf/model_tflops: achieved model FLOP/s, on any device; perf/mfu needs the device's peak (GPU datasheet table
    # or peak_flops), so a CPU run's summary has no MFU rather than a made-up one
    summary_metrics: ClassVar[tuple[str, ...]] = ("val/bpb", "perf/tokens_per_s", "perf/model_tflops", "perf/mfu")
    summary_missing: ClassVar[dict[str, str]] = {
        "perf/mfu": "n/a: no peak FLOP/s for this device (set model.init_args.peak_flops)"}
    contract_kind: ClassVar[str] = CHECKPOINT_KIND
    # Whether the subclass's training_step goes through train_loss (so loss_chunk_size and compile do something).
    uses_train_loss: ClassVar[bool] = False

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 100,
                 total_steps: int | None = None, min_lr_ratio: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 reinforce_weight: float | None = None, baseline_momentum: float | None = None,
                 balance_weight: float = 0.0, peak_flops: float | None = None, throughput_every: int = 10,
                 loss_chunk_size: int = 0, compile: bool = False, activation_checkpointing: bool = False,
                 mixed_precision: bool | None = None) -> None:
        super().__init__()
        # Collects this signature and the subclass's (Lightning reads every __init__ frame of the object).
        self.save_hyperparameters()
        check_optim_args(self.hparams)
        if loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size={loss_chunk_size} must be >= 0 (0 turns chunking off)")
        for key, unused in (("loss_chunk_size", loss_chunk_size != 0), ("compile", compile)):
            if unused and not self.uses_train_loss:
                raise ValueError(f"model.{key}={self.hparams[key]!r} has no effect: {type(self).__name__}'s "
                                 "training step needs the full logits; remove the key")
        self._compiled_train_loss: Any = None
        self.model: nn.Module | None = None
        self.model_name: str = ""
        self.model_overrides: dict[str, Any] = {}
        self._config: Any = None
        self.tokenizer_spec: str | None = None  # the data module's tokenizer, recorded in the checkpoint contract
        # Running mean of the REINFORCE reward, seeded by the first batch's mean (flag = 0 until then) rather
        # than an arbitrary constant. Buffers, so a resumed run keeps them.
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("reward_baseline_set", torch.zeros(()))
        self.bytes_per_token: dict[str, float] = {}
        self._flops_per_token: float | None = None
        self._tok_count = 0
        self._tok_mark: float | None = None
        self._val_started = 0.0
        self._val_sum = torch.zeros(())
        self._val_n = torch.zeros(())

    # -- the trained model ---------------------------------------------------------------------------------------
    def declare_model(self, name: str, overrides: dict[str, Any] | None, key: str = "model") -> None:
        """Name the trained model; its config is checked now (meta-device build), its weights made in configure_model.

        ``key`` is the init argument naming it, for error messages (``model``, ``student``).
        """
        self.model_name, self.model_overrides = name, dict(overrides or {})
        meta = zoo.create(name, device="meta", **self.model_overrides)
        if not hasattr(meta, "config"):
            raise ValueError(f"{key}={name!r} is not a zoo language model (it has no .config); "
                             "pick one of the Transformer names in zoo.available()")
        self._config = meta.config
        self._check_routing_knobs()

    def _check_routing_knobs(self) -> None:
        # A knob that does nothing for this model is an error, so a config never claims a setting it does not use.
        c, hp = self._config, self.hparams
        if c.ffn == ROUTED and c.router == "rlr":
            return
        for key, unused in (("reinforce_weight", hp.reinforce_weight is not None),
                            ("baseline_momentum", hp.baseline_momentum is not None),
                            ("balance_weight", hp.balance_weight != 0.0)):
            if unused:
                raise ValueError(f"model.{key}={hp[key]!r} has no effect: only the RL-R router (model_overrides: "
                                 f"{{ffn: routed, router: rlr}}) uses it, and {self.model_name!r} has "
                                 f"ffn={c.ffn!r}" + (f", router={c.router!r}" if c.ffn == ROUTED else "")
                                 + "; remove the key")

    @property
    def config(self) -> Any:
        """The trained Transformer's config (available before the weights are built)."""
        return self.model.config if self.model is not None else self._config

    def configure_model(self) -> None:
        """Build the trained model (a no-op when it exists); Lightning calls this in the strategy's init context.

        Under ``FSDP2Strategy`` (a device mesh is set) it is built on meta, sharded per block and materialised
        sharded (lm.parallel.sharding); otherwise built whole.
        """
        if self.model is not None:
            return
        hp = self.hparams
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("--trainer.strategy fsdp is FSDP1, which wraps the model whole and does not run on CPU; "
                             f"use --trainer.strategy {STRATEGY_NAME} (FSDP2, sharded per block)")
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            # Lightning hands sync_batchnorm to the strategy but only DDP applies it: here it is applied before
            # sharding, so batch norm in training mode (a trained vision encoder) sees the global batch.
            layer_sync = getattr(self.trainer.strategy, "_layer_sync", None) if self._trainer is not None else None
            self.model = build_sharded(self.model_name, self.model_overrides, mesh,
                                       activation_checkpointing=hp.activation_checkpointing,
                                       mixed_precision=hp.mixed_precision, whole=self.whole_parts(),
                                       layer_sync=layer_sync)
            return
        if hp.mixed_precision:  # a knob set to a value that would do nothing is an error
            raise ValueError(f"mixed_precision={hp.mixed_precision} applies only under --trainer.strategy "
                             f"{STRATEGY_NAME}; without sharding use --trainer.precision bf16-mixed instead")
        model = zoo.create(self.model_name, **self.model_overrides)
        if hp.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model = model

    def whole_parts(self) -> dict[str, nn.Module]:
        """Submodules a sharded build takes from small whole-built modules (name -> module) instead of a fresh
        init on meta; none for a plain LM."""
        return {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the model before Lightning loads its weights (``load_from_checkpoint`` outside a Trainer)."""
        self.configure_model()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the checkpoint contract: what a reader needs to rebuild the trained model (zoo.load_lm reads it)."""
        checkpoint[CONTRACT_KEY] = {"format": CONTRACT_VERSION, "kind": self.contract_kind, "model": self.model_name,
                                    "overrides": dict(self.model_overrides), "prefix": "model.",
                                    "tokenizer": self.tokenizer_spec}

    def forward(self, input_ids: Tensor | None = None, **kwargs: Any) -> Any:
        """The trained model's forward (logits [B, T, V] by default; see zoo.models.transformer.Transformer)."""
        self.configure_model()
        return self.model(input_ids, **kwargs)

    # -- data checks ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the data module's tokenizer and seq_len against the model; read its bytes per token."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        vocab = dm.vocab_size if hasattr(dm, "vocab_size") else None
        spec = getattr(dm, "tokenizer_spec", None)
        check_data_fits(self.model_name, self.config, vocab, getattr(dm, "seq_len", None), spec)
        self.tokenizer_spec = None if spec is None else str(spec)
        if hasattr(dm, "bytes_per_token"):
            if getattr(dm, "meta", None) is None:
                dm.setup(stage)
            self.bytes_per_token = {s: dm.bytes_per_token(s) for s in ("train", "val")}

    # -- shared step pieces --------------------------------------------------------------------------------------
    def run_model(self, tokens: Tensor, chunked: bool = False) -> tuple[TransformerOutput, Tensor]:
        """Forward on tokens[:, :-1]: the model's output and the per-token NLL [B, T] of tokens[:, 1:].

        ``chunked`` with ``loss_chunk_size`` > 0: the NLL comes from chunked_token_nll and ``out.logits`` is None.
        """
        chunk = self.hparams.loss_chunk_size if chunked else 0
        if chunk:
            out = self(tokens[:, :-1], return_aux=True, compute_logits=False)
            return out, chunked_token_nll(self.model.logits, out.hidden, tokens[:, 1:], chunk)
        out = self(tokens[:, :-1], return_aux=True)
        return out, token_nll(out.logits, tokens[:, 1:])

    def train_loss(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of tokens [B, T+1] (chunked when configured, + routing losses) and its metrics.

        Pure tensor code (no logging, no host sync), so it compiles as one graph; metrics are detached tensors for
        the caller to log.
        """
        out, nll = self.run_model(tokens, chunked=True)
        loss = nll.mean()
        routing, metrics = self.routing_terms(out, nll, "train")
        # No `+ 0` for models without routing losses: inductor folds it away and (torch 2.14) then returns the
        # total detached, sharing storage with the detached metric.
        total = loss if routing is None else loss + routing
        return total, {"train/loss": loss.detach(), **metrics}

    def compiled_train_loss(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """train_loss through torch.compile(fullgraph=True) when ``compile`` is set, else eagerly."""
        if not self.hparams.compile:
            return self.train_loss(tokens)
        self.configure_model()
        if hasattr(self.model, "prepare_block_masks"):  # built here, eagerly: the graph only reads them
            self.model.prepare_block_masks(tokens.shape[1] - 1, tokens.device)
        if self._compiled_train_loss is None:
            self._compiled_train_loss = torch.compile(self.train_loss, fullgraph=True)
        return self._compiled_train_loss(tokens)

    def routing_loss(self, out: TransformerOutput, nll: Tensor, stage: str) -> Tensor:
        """Weighted RL-R losses (REINFORCE with reward = token log-likelihood minus a running mean, plus load
        balancing) to add to the training loss; logs per-expert load and routing entropy."""
        loss, metrics = self.routing_terms(out, nll, stage)
        for key, value in metrics.items():
            self.log(key, value)
        return nll.new_zeros(()) if loss is None else loss

    def routing_terms(self, out: TransformerOutput, nll: Tensor, stage: str
                      ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """routing_loss's loss (None when the model has none) and its metrics (per-expert load, entropies, RL-R
        terms), without logging."""
        rl = balance = nll.new_zeros(())
        logs: dict[str, Tensor] = {}
        if not out.routing:
            return None, logs
        reward = -nll.detach()
        # The baseline includes this batch: while the loss falls fast, a lagging mean would make every advantage
        # positive and reinforce whichever expert happened to be picked (routing collapse).
        # torch.where, not `if`: no host-device sync per step on GPU.
        hp = self.hparams
        m = BASELINE_MOMENTUM if hp.baseline_momentum is None else hp.baseline_momentum
        mean = reward.mean()
        base = torch.where(self.reward_baseline_set > 0, m * self.reward_baseline + (1 - m) * mean, mean)
        used_rl = False
        for i, aux in enumerate(out.routing):
            load = aux.stats["load"]
            if load.numel() <= 16:
                for e in range(load.numel()):
                    logs[f"{stage}/route{i}/load_e{e}"] = load[e]
            else:  # many experts: the extremes say whether routing is balanced
                logs[f"{stage}/route{i}/load_max"] = load.max()
                logs[f"{stage}/route{i}/load_min"] = load.min()
            for key in ("load_entropy", "router_entropy"):
                if key in aux.stats:
                    logs[f"{stage}/route{i}/{key}"] = aux.stats[key]
            if stage == "train" and aux.log_prob is not None:
                rl = rl + reinforce_loss(aux.log_prob, reward, base)
                used_rl = True
            if stage == "train" and aux.balance_loss is not None:
                balance = balance + aux.balance_loss
                logs[f"train/route{i}/balance_loss"] = aux.balance_loss.detach()
        if not used_rl:
            return None, logs
        self.reward_baseline.copy_(base)
        self.reward_baseline_set.fill_(1.0)
        logs["train/reinforce_loss"] = rl.detach()
        logs["train/reward_baseline"] = self.reward_baseline.detach().clone()
        weight = REINFORCE_WEIGHT if hp.reinforce_weight is None else hp.reinforce_weight
        return weight * rl + hp.balance_weight * balance, logs

    def log_bpb(self, stage: str, loss: Tensor, prog_bar: bool = False, sync_dist: bool = False) -> None:
        """Log {stage}/bpb from a mean NLL when the data module gave its bytes per token."""
        if stage in self.bytes_per_token:
            self.log(f"{stage}/bpb", bits_per_byte(loss.detach(), self.bytes_per_token[stage]), prog_bar=prog_bar,
                     sync_dist=sync_dist)

    # -- throughput ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Throughput and MFU over the last ``throughput_every`` steps (first window skipped: warm-up)."""
        _, tokens = split_batch(batch)
        b, t1 = tokens.shape
        if self._flops_per_token is None:
            self._flops_per_token = mfu_flops_per_token(self.model, t1 - 1)
        self._tok_count += b * (t1 - 1) * self.trainer.world_size
        if (batch_idx + 1) % self.hparams.throughput_every:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only at window ends: per-step syncs would slow training
        now = time.perf_counter()
        if self._tok_mark is not None:
            rate = self._tok_count / max(now - self._tok_mark, 1e-9)
            self.log("perf/tokens_per_s", rate)
            self.log("perf/model_tflops", self._flops_per_token * rate / 1e12)  # training FLOPs (6N + attention)
            peak = self.hparams.peak_flops or peak_flops(self.device)
            util = mfu(self._flops_per_token, rate, peak, self.trainer.world_size)
            if util is not None:
                self.log("perf/mfu", util)
        self._tok_mark, self._tok_count = now, 0

    def on_train_epoch_start(self) -> None:
        """Restart the throughput window so evaluation time is not counted as training time."""
        self._tok_mark, self._tok_count = None, 0

    # -- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        """Reset the token-weighted validation sums."""
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_n = torch.zeros((), device=self.device, dtype=torch.float64)

    def on_validation_start(self) -> None:
        """Validation pauses the throughput window (its time is not training time)."""
        self._val_started = time.perf_counter()

    def on_validation_end(self) -> None:
        """Resume the throughput window where it paused, so a window spanning a validation still counts (with
        ``val_check_interval <= throughput_every`` no window would otherwise ever close)."""
        if self._tok_mark is not None:
            self._tok_mark += time.perf_counter() - self._val_started

    def accumulate_val(self, nll: Tensor) -> None:
        """Add a batch's summed NLL and token count (exact token-weighted mean, not a mean of batch means)."""
        self._val_sum += nll.double().sum()
        self._val_n += nll.numel()

    def on_validation_epoch_end(self) -> None:
        """Log val/loss, val/ppl and val/bpb from the summed NLL across all ranks."""
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        n = self.trainer.strategy.reduce(self._val_n, reduce_op="sum")
        if float(n) == 0:
            return
        loss = (total / n).float()
        # every rank holds the same, already summed value, so sync_dist's mean over ranks changes nothing; without it
        # Lightning warns "It is recommended to use sync_dist=True" for every epoch-level value under DDP / FSDP
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        self.log_bpb("val", loss, prog_bar=True, sync_dist=True)

    # -- optimiser -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        """AdamW (no decay on norms/biases/embeddings) with per-step warmup + cosine to min_lr_ratio of peak."""
        self.configure_model()
        hp = self.hparams
        opt = make_adamw(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=hp.betas, eps=hp.eps)
        total = hp.total_steps or int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == math.inf:
            raise ValueError("cannot size the cosine schedule: set trainer.max_steps or model total_steps")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, 1.0, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
