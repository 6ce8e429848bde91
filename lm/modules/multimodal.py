"""``lm.MultimodalLM``: a multimodal decoder (zoo.models.multimodal) trained on interleaved image-text sequences.

A sibling of ``lm.CausalLM`` on ``lm.LMModule`` (AdamW, warmup + cosine, routed-model losses, the checkpoint
contract). The loss is the mean NLL over the batch's text targets only (``labels`` != -100: the answers and their
EOS, never an image position, BOI/EOI or the prompt), normalised by the global target count so that DDP on k
processes equals one process with k times the batch. Validation logs the target NLL and the answer accuracy of
greedy generation on held-out images (``val/answer_acc`` and ``val/answer_acc_<task>``).

Checkpoints carry the LM contract (``zoo.load_lm`` rebuilds the whole multimodal model) and, under
``checkpoint["zoo"]["image_encoder"]``, an image-encoder contract naming the vision tower's architecture and its
state-dict prefix (``model.encoder.``), so ``zoo.load_backbone`` (and ``zoo probe``) read the encoder alone.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

import zoo
from lm.modules.base import LMModule, token_nll
from lm.parallel.flops import mfu_flops_per_token
from lm.parallel.hardware import mfu, peak_flops
from zoo.data.interleaved import TASKS, answer_accuracy, answer_budget
from zoo.models.multimodal import MultimodalDecoder
from zoo.train.trainer import NAN_POLICIES, UsageError, check_finite_loss
from zoo.weights.checkpoint import CONTRACT_KEY, CONTRACT_VERSION


class MultimodalLM(LMModule):
    """Training of a zoo multimodal decoder on interleaved image-text batches (zoo.data.InterleavedDataModule).

    Args:
        model: registry name of the multimodal decoder (e.g. ``vlm-digits-tiny``; zoo.available()).
        model_overrides: MultimodalDecoder keywords, e.g. ``{train_encoder: full, decoder_overrides: {n_layers: 2}}``.
        encoder_weights: a file ``zoo.load_backbone`` reads (BYOL checkpoint, export, torchvision/timm weights) whose
            encoder replaces the model's at build time (None: the encoder's own init).
        encoder_which: which encoder of that file (``online`` / ``target``).
        nan_policy: ``stop`` (raise on a non-finite loss) or ``skip`` (count the step and make no update).
        eval_samples: held-out sequences whose answers are generated at each validation (None: all).
        eval_batch_size: sequences per generation call.
        **kwargs: the optimisation and logging options of lm.LMModule (lr, weight_decay, warmup_steps, ...).
    """

    summary_metrics: ClassVar[tuple[str, ...]] = ("val/answer_acc", "val/loss", "perf/tokens_per_s", "perf/mfu")

    def __init__(self, model: str = "vlm-digits-tiny", model_overrides: dict[str, Any] | None = None,
                 encoder_weights: str | None = None, encoder_which: str = "online", nan_policy: str = "stop",
                 eval_samples: int | None = 200, eval_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if nan_policy not in NAN_POLICIES:
            raise UsageError(f"model.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if eval_samples is not None and eval_samples < 0:
            raise UsageError(f"model.eval_samples must be >= 0 or null, got {eval_samples}")
        if eval_batch_size < 1:
            raise UsageError(f"model.eval_batch_size must be >= 1, got {eval_batch_size}")
        self.declare_model(model, model_overrides)
        meta = zoo.create(model, device="meta", **self.model_overrides)
        if not isinstance(meta, MultimodalDecoder):
            raise UsageError(f"model={model!r} is not a multimodal decoder; pick a vlm-* name from zoo.available() "
                             "or train it with lm.CausalLM")
        self.layout = {"tokens_per_image": meta.tokens_per_image, "image_size": meta.image_size,
                      "image_id": meta.image_id, "encoder": meta.encoder_name,
                      "encoder_overrides": dict(meta.encoder_overrides)}
        self.nonfinite_steps = 0
        self._flops_count = 0.0
        self._flops_per_image = 0.0

    def configure_model(self) -> None:
        """Build the model (a no-op when it exists) with ``encoder_weights`` in its encoder.

        Under ``--trainer.strategy fsdp2`` the encoder is built whole first (see whole_parts) and then sharded.
        """
        if self.model is not None:
            return
        super().configure_model()
        if getattr(self, "_device_mesh", None) is None:
            self.load_encoder_weights(self.model.encoder)

    def whole_parts(self) -> dict[str, torch.nn.Module]:
        """The vision encoder, built whole with its builder's own init (and ``encoder_weights``): it is small, and a
        meta build would lose that init (e.g. ResNet's) and could not load weights into shards."""
        encoder = zoo.create(self.layout["encoder"], **self.layout["encoder_overrides"])
        self.load_encoder_weights(encoder)
        return {"encoder": encoder}

    def read_encoder_weights(self, path: str, encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The state dict of ``encoder_weights``, checked against ``encoder`` (this model's): a missing file, a
        language-model checkpoint or an encoder of another width or shape is one UsageError line naming it."""
        try:
            loaded = zoo.load_backbone(path, which=self.hparams.encoder_which)
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"model.encoder_weights {path!r} cannot be used: {str(err).strip()}") from None
        if getattr(loaded, "num_features", None) != encoder.num_features:
            raise UsageError(f"encoder_weights {path!r} hold a {getattr(loaded, 'zoo_arch', '?')} encoder with "
                             f"{getattr(loaded, 'num_features', '?')}-wide features but the projector of "
                             f"{self.model_name!r} takes {encoder.num_features} ({self.layout['encoder']}); set "
                             f"model_overrides: {{encoder: {getattr(loaded, 'zoo_arch', '<its arch>')}}}")
        state, want = loaded.state_dict(), encoder.state_dict()
        bad = sorted(set(state) ^ set(want)) or [k for k in want if tuple(state[k].shape) != tuple(want[k].shape)]
        if bad:
            raise UsageError(f"encoder_weights {path!r} ({getattr(loaded, 'zoo_arch', '?')}) do not fit the model's "
                             f"encoder {self.layout['encoder']}: tensor {bad[0]!r} is missing, extra or of another "
                             "shape")
        return state

    def load_encoder_weights(self, enc: torch.nn.Module) -> None:
        """Load ``encoder_weights`` (if set) into ``enc``, an encoder of this model's architecture."""
        path = self.hparams.encoder_weights
        if path is not None:
            enc.load_state_dict(self.read_encoder_weights(path, enc))

    # -- data checks ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the interleaved data against the model: vocabulary, lengths, tokens per image, image size."""
        super().setup(stage)
        if stage == "fit" and self.model_overrides.get("train_encoder", "frozen") != "full":
            # A frozen encoder (or its frozen stages) stays in eval mode on purpose, so its batch-norm statistics do
            # not move: Lightning's "modules in eval mode" warning says nothing the config did not ask for.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.check_data(dm)

    def check_data(self, dm: Any) -> None:
        """Raise a one-line UsageError when the data module's sequences or images do not fit this model."""
        for key in ("tokens_per_image", "image_size"):
            if getattr(dm, key, None) != self.layout[key]:
                raise UsageError(f"data.{key}={getattr(dm, key, None)} but model {self.model_name!r} takes "
                                 f"{key}={self.layout[key]}; set data.{key}: {self.layout[key]} (or model_overrides: "
                                 f"{{{key}: {getattr(dm, key, None)}}})")
        if dm.image_tokens.image != self.layout["image_id"]:
            raise UsageError(f"the data's IMAGE id is {dm.image_tokens.image} (tokenizer {dm.tokenizer_spec!r}) but "
                             f"the model's is {self.layout['image_id']}; build the decoder on the data's tokenizer "
                             "vocabulary")
        dm.check_model_fits(self.config.vocab_size, self.config.max_seq_len)

    # -- steps ---------------------------------------------------------------------------------------------------
    def text_nll(self, batch: dict[str, Any]) -> tuple[Any, Tensor, Tensor]:
        """(model output, per-token NLL [B, T] with 0 where there is no target, target mask [B, T])."""
        out = self(batch["input_ids"], images=batch["images"], return_aux=True)
        labels = batch["labels"]
        nll = token_nll(out.logits, labels)  # cross_entropy's ignore_index -100: exactly 0 at non-targets
        return out, nll, labels != -100

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Mean NLL of the text targets over all ranks (+ REINFORCE for RL-R routers)."""
        out, nll, mask = self.text_nll(batch)
        n = mask.sum().float()
        world = self.trainer.world_size if self._trainer is not None else 1
        # DDP averages gradients over ranks: scale by world / global count so the result is the global token mean.
        total = self.trainer.strategy.reduce(n, reduce_op="sum") if world > 1 else n
        loss = nll.sum() * world / total.clamp_min(1)
        routing = self.routing_loss(out, nll, "train")
        if self._trainer is not None and not check_finite_loss(self, loss, self.hparams.nan_policy):
            return None  # every rank skips together: no backward, no optimiser step
        self.log("train/loss", nll.sum() / n.clamp_min(1), prog_bar=True)
        return loss + routing

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the text targets' summed NLL and count; log routing statistics."""
        out, nll, mask = self.text_nll(batch)
        self.routing_loss(out, nll, "val")
        self.accumulate_val(nll[mask])

    def on_validation_epoch_end(self) -> None:
        """val/loss (text targets) and the answer accuracy of greedy generation on held-out images, per task."""
        super().on_validation_epoch_end()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "val_set", None) is None or self.hparams.eval_samples == 0:
            return
        n = len(dm.val_set) if self.hparams.eval_samples is None else min(self.hparams.eval_samples, len(dm.val_set))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        sharded = getattr(self, "_device_mesh", None) is not None
        if sharded:
            # Every forward of a sharded model is a collective, so every rank must make the same calls: each one
            # generates on all the samples (the same counts everywhere, so they are not summed below).
            rank, world = 0, 1
        report = self.answer_accuracy([dm.val_set[i] for i in range(rank, n, world)], dm.tokenizer)
        counts = torch.zeros(2 * (len(TASKS) + 1), dtype=torch.float64, device=self.device)
        for k, task in enumerate((*TASKS, "all")):
            if task in report:
                counts[2 * k], counts[2 * k + 1] = report[task]["correct"], report[task]["total"]
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum") if world > 1 else counts
        for k, task in enumerate((*TASKS, "all")):
            if counts[2 * k + 1] > 0:
                name = "val/answer_acc" if task == "all" else f"val/answer_acc_{task}"
                # summed over ranks above: the same on every rank (see LMModule.on_validation_epoch_end)
                self.log(name, (counts[2 * k] / counts[2 * k + 1]).float(), prog_bar=task == "all", sync_dist=True)

    @torch.no_grad()
    def answer_accuracy(self, samples: list, tokenizer: Any) -> dict[str, dict[str, float]]:
        """Exact-match accuracy per task of greedy, cached generation on ``samples`` (InterleavedSample list)."""
        self.configure_model()
        budget, eos = answer_budget(samples), getattr(tokenizer, "eos_id", None)
        was = self.model.training
        self.model.eval()
        try:
            return answer_accuracy(lambda ids, imgs: self.model.generate(ids.to(self.device), imgs.to(self.device),
                                                                         budget, eos_id=None),
                                   samples, self.hparams.eval_batch_size)
        finally:
            self.model.train(was)

    # -- throughput ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Tokens/s and MFU over ``throughput_every`` steps; FLOPs count the decoder, the encoder and projector."""
        b, t = batch["input_ids"].shape
        if self._flops_per_token is None:
            self._flops_per_token = mfu_flops_per_token(self.model.decoder, t)
            # Counted on a meta build (shapes only): the trained model's encoder and projector may be sharded.
            meta = zoo.create(self.model_name, device="meta", **self.model_overrides)
            self._flops_per_image = meta.training_flops_per_image()
        world = self.trainer.world_size
        self._tok_count += b * t * world
        self._flops_count += (self._flops_per_token * b * t
                              + self._flops_per_image * batch["images"].shape[0]) * world
        if (batch_idx + 1) % self.hparams.throughput_every:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._tok_mark is not None:
            dt = max(now - self._tok_mark, 1e-9)
            self.log("perf/tokens_per_s", self._tok_count / dt)
            util = mfu(self._flops_count / dt, 1.0, self.hparams.peak_flops or peak_flops(self.device), world)
            if util is not None:
                self.log("perf/mfu", util)
        self._tok_mark, self._tok_count, self._flops_count = now, 0, 0.0

    def on_train_epoch_start(self) -> None:
        """Restart the throughput window (evaluation time is not training time)."""
        super().on_train_epoch_start()
        self._flops_count = 0.0

    # -- checkpoint contract -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The LM contract plus the vision tower's image-encoder contract (read by zoo.load_backbone)."""
        super().on_save_checkpoint(checkpoint)
        method = f"{type(self).__module__.split('.')[0]}.{type(self).__name__}"  # "lm.MultimodalLM", as ssl.py names it
        checkpoint[CONTRACT_KEY]["image_encoder"] = {
            "format": CONTRACT_VERSION, "kind": "image-encoder", "method": method,
            "arch": self.layout["encoder"], "overrides": dict(self.layout["encoder_overrides"]),
            "encoders": {"online": "model.encoder."}, "classifier": None}
