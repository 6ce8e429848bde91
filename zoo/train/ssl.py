"""``ImagePretraining``: what every self-supervised image method shares, so a method is only its views, networks,
loss and optimizer.

The base owns the encoder (built from the registry), the linear classifier (the probe) on stop-gradient features
and its validation, the augmentation randomness (a pure function of seed, step and micro-batch; each DDP rank draws
its rows of the global batch, so N processes augment as one process with the N-times batch does), JPEG decode
on the device, the non-finite-step policy (snapshot, roll back, DDP-safe skip), undecodable-image accounting,
channels-last / ``torch.compile`` switches, the lr-schedule lengths and the checkpoint contract readers use
(``zoo.weights.checkpoint``). A method subclasses it and defines:

- ``build_networks(num_features)``: its heads (and targets), called between the encoder and the classifier;
- ``forward_views(views)``: the per-view forward (compiled when ``compile=True``), any outputs;
- ``compute_loss(outputs) -> (loss, features)``: the method loss and the encoder features of the first view;
- optionally ``optimizer_defaults`` (an ``OptimizerSpec``: the optimizer, lr, weight decay, exclusions and warmup
  the base builds; every field is also a ``model.*`` key), ``optimizer_groups`` (default: every trainable
  parameter), ``default_view_overrides`` (the two-view presets of ``augment.train_views``), ``make_views``,
  ``encoder_attrs``, ``classifier_attr``, ``metric_prefix``: the names of its modules and metrics (the base's are
  neutral; it reaches the modules only through ``main_encoder`` / ``probe_classifier``).

A method's ``__init__`` takes its own arguments and passes ``**kwargs`` on: the base's arguments (encoder, views,
optimizer, ...) are written once, here, and jsonargparse reads them through the ``**kwargs``.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

import augment
from augment import fused
from augment.decode import decode_batch
from augment.params import ViewParams
from zoo.models.registry import create
from zoo.train.distributed import gather_sizes, rows_of, takes_rows
from zoo.train.nan_skip import NanSkipMixin
from zoo.train.optim import OptimizerSpec, build_optimizer, fused_update, scaled_lr
from zoo.train.trainer import NAN_POLICIES, UsageError, check_finite_loss
from zoo.train.whole_step import WholeStep, WholeStepMixin
from zoo.weights.checkpoint import CONTRACT_KEY, CONTRACT_VERSION

__all__ = ["ImagePretraining", "OptimizerSpec", "check_sizes"]


def check_sizes(**sizes: int) -> None:
    """Head widths (and other counts) by argument name, each >= 1: one UsageError line naming the first that is not."""
    for key, value in sizes.items():
        if value < 1:
            raise UsageError(f"model.{key} must be >= 1, got {value}")


class ImagePretraining(NanSkipMixin, WholeStepMixin, pl.LightningModule):
    """Base of the image pretraining methods (one subclass per method package); see the module docstring.

    Args:
        encoder: registry name of the backbone (``zoo.available()``), e.g. ``resnet50``, ``resnet18_cifar``.
        encoder_overrides: keyword overrides for the backbone constructor.
        image_size: side of the augmented views.
        num_classes: classes of the linear classifier; None reads it from the datamodule.
        augment_overrides: preset overrides for ``augment.train_views`` (the two views), on top of the method's
            ``default_view_overrides`` (``blur_p``: both views, ``view2_solarize_p``: one; ``crop_sampler``:
            ``official`` | ``torchvision``, ``resize_kernel``: ``tf_bicubic`` | ``torch_bicubic``).
        eval_overrides: preset overrides for the classifier's validation view ``augment.LinearEvalTest``.
        aug_seed: seed of the augmentation randomness (combined with the rank and the step, see ``_generator``).
        compile: ``True``: ``torch.compile`` the per-view forward; ``"step"``: compile the whole training step (views,
            forwards, loss, classifier, optimizer update, EMA; ``zoo.train.whole_step``), with manual optimization.
        channels_last: use channels-last memory format (default: on GPU only).
        nan_policy: ``stop`` or ``skip`` on a non-finite loss.
        optimizer: ``lars`` | ``sgd`` | ``adamw``; this and every key below: null (left out) keeps the method's
            default (its ``optimizer_defaults``, ``zoo.train.optim.OptimizerSpec``).
        base_lr: lr per 256 images; the peak lr is ``base_lr * global_batch / 256``.
        weight_decay: weight decay (biases and norm parameters excluded when ``exclude_bias_norm``).
        momentum: LARS / SGD momentum (AdamW: beta1).
        lars_eta: LARS trust coefficient.
        exclude_bias_norm: no weight decay and no LARS adaptation for biases and normalisation parameters.
        excluded_lr_scale: lr multiplier of those excluded parameters.
        warmup_epochs: linear lr warmup from 0, in epochs (``warmup_steps`` overrides it).
        warmup_steps: linear lr warmup in steps, if set.
        final_lr_ratio: the cosine ends at this fraction of the peak lr.
    """

    min_batch_per_device = 2  # per-view batch-norm statistics need two images (checked before launch)
    supports_float64 = False  # the views are float32: trainer.precision 64 is refused before launch
    # Checkpoint contract: branch name -> attribute holding that encoder (the first: the trained one, which the base
    # builds); the classifier's attribute. A reader maps these to state-dict prefixes and never knows the method.
    encoder_attrs: dict[str, str] = {"main": "encoder"}
    classifier_attr: str = "classifier"
    # Logged as ``train/<prefix>_top1``, ``val/<prefix>_top1`` and ``val/<prefix>_top5``.
    metric_prefix: str = "probe"
    # The method's own view recipe as overrides of ``augment.train_view_presets`` (user's ``augment_overrides`` win).
    default_view_overrides: dict[str, Any] = {}
    # The method's optimisation recipe; each field is a ``model.*`` key a config may override.
    optimizer_defaults: OptimizerSpec = OptimizerSpec()

    def __init__(self, encoder: str = "resnet50", encoder_overrides: dict[str, Any] | None = None,
                 image_size: int = 224, num_classes: int | None = None,
                 augment_overrides: dict[str, Any] | None = None, eval_overrides: dict[str, Any] | None = None,
                 aug_seed: int = 0, compile: bool | Literal["step"] = False, channels_last: bool | None = None,
                 nan_policy: str = "stop", optimizer: Literal["lars", "sgd", "adamw"] | None = None,
                 base_lr: float | None = None, weight_decay: float | None = None, momentum: float | None = None,
                 lars_eta: float | None = None, exclude_bias_norm: bool | None = None,
                 excluded_lr_scale: float | None = None, warmup_epochs: float | None = None,
                 warmup_steps: int | None = None, final_lr_ratio: float | None = None) -> None:
        super().__init__()
        self.optim_spec = self.optimizer_defaults.replace(
            optimizer=optimizer, base_lr=base_lr, weight_decay=weight_decay, momentum=momentum, lars_eta=lars_eta,
            exclude_bias_norm=exclude_bias_norm, excluded_lr_scale=excluded_lr_scale, warmup_epochs=warmup_epochs,
            warmup_steps=warmup_steps, final_lr_ratio=final_lr_ratio)
        if compile not in (False, True, "step"):
            raise UsageError(f"model.compile must be false, true (per-view forward) or \"step\" (whole step), "
                             f"got {compile!r}")
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"model.num_classes must be >= 1, got {num_classes}")
        if nan_policy not in NAN_POLICIES:
            raise UsageError(f"model.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if image_size < 8:
            raise UsageError(f"model.image_size must be >= 8, got {image_size}")
        self.save_hyperparameters()  # collects the subclass's arguments too (Lightning walks the __init__ frames)
        # the resolved recipe, not the nulls: what the run used is what the checkpoint and the loggers record
        self.hparams.update({k: getattr(self.optim_spec, k) for k in OptimizerSpec.keys()})
        setattr(self, self.encoder_attr, create(encoder, **(encoder_overrides or {})))
        dim = self.main_encoder.num_features
        self.build_networks(dim)  # before the classifier: keeps the parameter init order (and RNG draws) fixed
        setattr(self, self.classifier_attr, nn.Linear(dim, num_classes) if num_classes else None)
        view_overrides = {**self.default_view_overrides, **(augment_overrides or {})}
        # "step" compiles the views inside the whole step, so they are not compiled on their own
        self.view1, self.view2 = augment.train_views(image_size, compile=compile is True, **view_overrides)
        self.eval_view = augment.LinearEvalTest(image_size, resize=round(image_size * 256 / 224),
                                                **(eval_overrides or {}))
        self._aug_gen: torch.Generator | None = None
        self._rows_ok: bool | None = None  # ``_draws_rows``, once known
        self._stepped = False
        self.skipped_images: list[str] = []
        self._compiled_views = None
        self._whole_step: WholeStep | None = None
        if compile == "step":
            self.automatic_optimization = False  # the step drives backward, update and EMA itself (compiled_step)

    # ---------------------------------------------------------------------------------------------- method hooks
    def build_networks(self, num_features: int) -> None:
        """Create the method's heads (and target networks) from the encoder's feature width."""
        raise NotImplementedError(f"{type(self).__name__} must define build_networks")

    def forward_views(self, views: list[torch.Tensor]) -> Any:
        """Forward of the method's networks on the augmented views (the part ``compile=True`` compiles)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_views")

    def compute_loss(self, outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(method loss, encoder features of the first view) from ``forward_views``'s outputs."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_loss")

    def make_views(self, images: Any, gen: torch.Generator, rows: tuple[int, int] | None = None
                   ) -> list[torch.Tensor]:
        """The augmented views of a batch, drawn from ``gen`` (default: the two ``augment.train_views``); ``rows``:
        the batch's ``(offset, total)`` in the global batch under DDP (``augment.params.sample_view_params``). An
        override without ``rows`` still works: its generator is then seeded per rank."""
        return [self.view1(images, gen, rows), self.view2(images, gen, rows)]

    def on_weights_updated(self) -> None:
        """Called after each optimizer step that was not skipped (``MomentumMixin`` moves its targets here)."""

    def view_params(self, images: Any, gen: torch.Generator, rows: tuple[int, int] | None = None
                    ) -> list[ViewParams]:
        """``compile="step"``: the per-sample parameters of each view, drawn from ``gen`` as ``make_views`` draws."""
        return [self.view1.sample_params(images, gen, rows), self.view2.sample_params(images, gen, rows)]

    def apply_views(self, images: Any, params: list[ViewParams]) -> list[torch.Tensor]:
        """``compile="step"``: the views from explicit parameters (batched schedule: static shapes, no branches)."""
        return [fused.apply_view(images, p, v.preset, False, v.dtype) for v, p in zip((self.view1, self.view2), params)]

    def optimizer_groups(self) -> list[dict]:
        """The parameter groups the optimizer spec applies to (default: one group of every trainable parameter; EMA
        targets have ``requires_grad=False``). A group may set ``weight_decay`` or ``constant_after_warmup``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        """The spec's optimizer over ``optimizer_groups()``, peak lr by the scaling rule, per-step warmup + cosine."""
        spec = self.optim_spec
        total, warmup = self.schedule_lengths(spec.warmup_epochs, spec.warmup_steps)
        opt, factors = build_optimizer(spec, self.optimizer_groups(), scaled_lr(spec.base_lr, self.global_batch()),
                                       total, warmup)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fused_optimizer_update(self, groups: list[tuple[list, list, list, dict]], lrs: torch.Tensor) -> None:
        """``compile="step"``: the optimizer update in tensor ops, per group (params, grads, momentum buffers, hyper-
        parameters) with ``lrs[i]`` the group's lr as a device scalar (a Python float would recompile every step)."""
        fused_update(self.optim_spec.optimizer, groups, lrs)

    def fused_step_scalars(self) -> dict[str, float]:
        """``compile="step"``: per-step scalars ``fused_weights_updated`` needs (passed as device tensors)."""
        return {}

    def fused_weights_updated(self, scalars: dict[str, torch.Tensor]) -> None:
        """``compile="step"``: ``on_weights_updated`` in tensor ops, traced into the update graph."""

    def step_logs(self) -> dict[str, Any]:
        """Extra values logged with each training step."""
        return {}

    # (a method must not name a module ``main_encoder`` / ``probe_classifier``: the property would shadow it)
    @property
    def encoder_attr(self) -> str:
        """The attribute holding the trained encoder: the first one ``encoder_attrs`` declares."""
        return next(iter(self.encoder_attrs.values()))

    @property
    def main_encoder(self) -> nn.Module:
        """The trained encoder (registered under ``encoder_attr``)."""
        return getattr(self, self.encoder_attr)

    @property
    def probe_classifier(self) -> nn.Linear | None:
        """The linear classifier on stop-gradient features (under ``classifier_attr``); None until sized."""
        return getattr(self, self.classifier_attr, None)

    def backbone(self) -> nn.Module:
        """The encoder a probe or an export evaluates (the trained encoder)."""
        return self.main_encoder

    # ---------------------------------------------------------------------------------------------- setup
    def input_bytes(self, batch_size: int) -> tuple[int, str]:
        """Bytes of the largest input tensor one device builds for a batch (checked against memory before launch):
        both float32 training views, or the resized evaluation view."""
        s = self.hparams.image_size
        r = round(s * 256 / 224)
        train, val = batch_size * 2 * 3 * s * s * 4, batch_size * 3 * r * r * 4
        if train >= val:
            return train, f"{batch_size} images x 2 views x 3 x {s}^2 float32, model.image_size={s}"
        return val, f"{batch_size} images x 3 x {r}^2 float32 evaluation view, model.image_size={s}"

    def setup(self, stage: str) -> None:
        """Size the classifier from the data and refuse batches too small for batch norm."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.probe_classifier is None:
            if dm is None or not hasattr(dm, "num_classes"):
                raise ValueError("model.num_classes is not set and the datamodule does not expose num_classes")
            setattr(self, self.classifier_attr, nn.Linear(self.main_encoder.num_features, dm.num_classes))
            self.hparams.num_classes = dm.num_classes
        check_view_size = getattr(dm, "check_view_size", None)
        if check_view_size is not None:  # data stored at one size (the digits) refuses views of another
            check_view_size(self.hparams.image_size)
        if stage == "fit" and dm is not None and getattr(dm, "batch_size", 2) < 2:
            raise ValueError(f"data.batch_size is {dm.batch_size} but {type(self).__name__}'s batch norm needs at "
                             "least 2 images per device (per-view batch statistics); use a batch size of 2 or more")
        if self._use_channels_last():
            self.to(memory_format=torch.channels_last)

    def _use_channels_last(self) -> bool:
        cl = self.hparams.channels_last
        return bool(torch.cuda.is_available()) if cl is None else bool(cl)

    def global_batch(self) -> int:
        """Images per optimizer step across every device (the lr scaling rule's batch)."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError(f"the datamodule has no batch_size; {type(self).__name__} needs it to scale the lr")
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch, whatever the budget (``max_epochs`` or ``max_steps``).

        ``num_training_batches`` is still unset (inf) when ``max_epochs`` is -1, since Lightning then skips loading
        the training data to estimate the budget; it is loaded here instead. An iterable loader without a length
        has no epochs to count: a warmup in epochs is refused, naming ``model.warmup_steps``.
        """
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            trainer.fit_loop.setup_data()
            batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise UsageError(f"model.warmup_epochs={self.hparams.warmup_epochs} needs the number of batches per epoch, "
                             "but the training loader has no length; set model.warmup_steps instead")
        return max(int(batches) // trainer.accumulate_grad_batches, 1)

    def schedule_lengths(self, warmup_epochs: float, warmup_steps: int | None) -> tuple[int, int]:
        """(total optimizer steps, warmup steps) of the run; also kept as ``total_steps`` and ``warmup``."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise UsageError("trainer.max_steps and trainer.max_epochs are both -1 (train forever), but "
                             f"{type(self).__name__}'s schedules need a length: set trainer.max_steps or "
                             "trainer.max_epochs")
        total = int(total)
        if warmup_steps is not None:
            warmup = int(warmup_steps)
        elif warmup_epochs == 0:
            warmup = 0
        else:
            warmup = int(round(warmup_epochs * self.steps_per_epoch()))
        warmup = min(warmup, max(total - 1, 0))
        self.total_steps, self.warmup = total, warmup
        return total, warmup

    # ---------------------------------------------------------------------------------------------- training step
    def _draws_rows(self) -> bool:
        """Whether this method's views can draw their rows of the global batch (``make_views`` / ``view_params``
        take ``rows``; an override may not)."""
        if self._rows_ok is None:  # asked twice per step: the signature is read once
            self._rows_ok = takes_rows(self.view_params if self.hparams.compile == "step" else self.make_views)
        return self._rows_ok

    def _generator(self, batch_idx: int) -> torch.Generator:
        """The augmentation generator, re-seeded for this (seed, optimizer step, micro-batch), the same on every rank
        (each draws its rows of the global batch: ``_global_rows``), or also per rank for views that cannot.

        A pure function of the position in training, so no generator state has to be saved: a resumed run (any rank,
        any interruption point, any device count) draws exactly the views the uninterrupted run drew.
        """
        if self._aug_gen is None or self._aug_gen.device != self.device:
            self._aug_gen = torch.Generator(device=self.device)
        micro = batch_idx % self.trainer.accumulate_grad_batches
        rank = 0 if self._draws_rows() else self.global_rank
        seed = ((self.hparams.aug_seed * 1_000_003 + self.global_step) * 1_009 + micro) * 65_537 + rank
        return self._aug_gen.manual_seed(seed % (1 << 63))

    def _global_rows(self, n: int) -> tuple[bool, dict[str, Any]]:
        """(every rank has >= 2 decodable images, the ``rows`` keyword of this rank's views): one gather of the
        ranks' image counts under DDP (every rank must skip a step together, or the others would hang)."""
        trainer = getattr(self, "_trainer", None)  # this run's world, not whatever process group exists
        sizes = gather_sizes(n, self.device) if trainer is not None and trainer.world_size > 1 else [n]
        rows = rows_of(sizes, self.global_rank) if self._draws_rows() else None
        return min(sizes) >= 2, ({"rows": rows} if rows is not None else {})

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Decode raw JPEG bytes on the device they were moved to; drop and record undecodable files."""
        self.skipped_images.extend(batch.get("skipped", []))
        images = batch["image"]
        if isinstance(images, list) and images and images[0].dim() == 1:
            decoded, bad = decode_batch(images, self.device)
            if bad:
                keep = [i for i in range(len(images)) if i not in set(bad)]
                paths = batch.get("path") or [f"<batch item {i}>" for i in range(len(images))]
                self.skipped_images.extend(paths[i] for i in bad)
                batch["label"] = batch["label"][keep]
            batch["image"] = decoded
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Views, the method's loss, the classifier on stop-gradient first-view features."""
        if self.hparams.compile == "step":
            return self.compiled_step(batch, batch_idx)
        self._stepped = False
        labels = batch["label"]
        enough, rows = self._global_rows(len(labels))
        if not enough:
            rank_zero_warn(f"skipping step {self.global_step}: fewer than 2 decodable images in the batch")
            return self._skipped_step_loss()
        views = self.make_views(batch["image"], self._generator(batch_idx), **rows)
        if self._use_channels_last():
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        forward = self.forward_views
        if self.hparams.compile is True:
            if self._compiled_views is None:
                self._compiled_views = torch.compile(self.forward_views)
            forward = self._compiled_views
        loss, h1 = self.compute_loss(forward(views))
        logits = self.probe_classifier(h1.detach())  # stop-gradient: the probe must not shape the encoder
        cls_loss = F.cross_entropy(logits.float(), labels)
        total = loss + cls_loss
        if not check_finite_loss(self, total, self.hparams.nan_policy):
            # A skipped step must leave no trace: its forward already moved the batch-norm statistics (to NaN, say).
            self._restore_snapshot()
            return self._skipped_step_loss()
        self._stepped = True
        top1 = (logits.argmax(-1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/cls_loss": cls_loss, f"train/{self.metric_prefix}_top1": top1,
                       **self.step_logs()}, prog_bar=True, sync_dist=False)
        return total

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then ``on_weights_updated`` (EMA targets), then the finite-state check.

        The hook runs here rather than in ``on_train_batch_end`` because callbacks' batch-end hooks (periodic and
        preemption checkpoints) run before the module's: a checkpoint written there would miss this step's EMA.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._stepped:
            self.on_weights_updated()
            if self.hparams.nan_policy == "skip":
                self._check_finite_state()

    # ---------------------------------------------------------------------------------------------- compile: step
    def on_train_start(self) -> None:
        """``compile="step"``: refuse what manual optimization cannot do; create the momentum buffers up front, so the
        optimizer state has the same tensors from the first step on (no recompile, a stable snapshot)."""
        if self.hparams.compile != "step":
            return
        self.fused_optimizer_update([], torch.zeros(0))  # an optimizer without a fused update: the one-line UsageError
        if self.trainer.accumulate_grad_batches != 1:
            raise UsageError(f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} does not work "
                             "with model.compile: step (manual optimization); use 1 or model.compile: true")
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        count = getattr(self, "_nonfinite", None)  # kept across fits of one module, as the eager nonfinite_steps
        self._nonfinite = torch.zeros((), device=self.device) if count is None else count.to(self.device)

    def on_train_epoch_end(self) -> None:
        """Report undecodable images once per epoch (paths, from every rank), and count them."""
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, self.skipped_images)
            self.skipped_images = [p for part in gathered for p in part]
        if self.skipped_images:
            shown = ", ".join(self.skipped_images[:10])
            rank_zero_warn(f"epoch {self.current_epoch}: skipped {len(self.skipped_images)} undecodable images: {shown}"
                           + (" ..." if len(self.skipped_images) > 10 else ""))
        self.log("data/skipped_images", float(len(self.skipped_images)))
        self.skipped_images = []
        if self.hparams.compile == "step" and self.hparams.nan_policy == "skip":
            # the compiled step never reads its finite flag on the host; the skipped steps are reported here instead
            self.nonfinite_steps = int(self._nonfinite)  # one host sync per epoch
            if self.nonfinite_steps:
                rank_zero_warn(f"epoch {self.current_epoch}: {self.nonfinite_steps} non-finite steps skipped so far "
                               "(nan_policy: skip)")
        if self._whole_step is not None and self._whole_step.eager_steps:
            rank_zero_warn(f"epoch {self.current_epoch}: {self._whole_step.eager_steps} steps ran eagerly (batch shape "
                           f"other than the compiled {self._whole_step.shape}, e.g. undecodable images removed)")

    # ---------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Classifier accuracy on the evaluation view (resize + centre crop)."""
        x = self.eval_view(batch["image"])
        if self._use_channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.probe_classifier(self.main_encoder(x))
        labels = batch["label"]
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices.eq(labels[:, None]).any(-1).float().mean()
        m = self.metric_prefix
        self.log_dict({f"val/{m}_top1": (logits.argmax(-1) == labels).float().mean(), f"val/{m}_top5": top5},
                      prog_bar=True, sync_dist=True, batch_size=len(labels))

    test_step = validation_step

    # ---------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_contract(self) -> dict[str, Any]:
        """What a reader of this checkpoint needs (``zoo.weights.checkpoint``): architecture, overrides, the
        state-dict prefix of each encoder and of the classifier."""
        hp = self.hparams
        return {"format": CONTRACT_VERSION, "kind": "image-encoder",
                "method": f"{type(self).__module__.split('.')[0]}.{type(self).__name__}",
                "arch": hp.encoder, "overrides": dict(hp.encoder_overrides or {}),
                "encoders": {branch: f"{attr}." for branch, attr in self.encoder_attrs.items()},
                "classifier": f"{self.classifier_attr}." if self.probe_classifier is not None
                else None}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write the checkpoint contract under ``checkpoint["zoo"]``."""
        checkpoint[CONTRACT_KEY] = self.checkpoint_contract()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the classifier before the weights are loaded (augmentation randomness needs no state, see
        ``_generator``)."""
        n = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if self.probe_classifier is None and n:
            setattr(self, self.classifier_attr, nn.Linear(self.main_encoder.num_features, n))
