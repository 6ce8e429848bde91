"""Protocol mode of the probe: the linear layers trained through the frozen encoder on augmented views (Lightning).

Every head of the lr grid and every final head trains in ONE pass over the augmented data (``zoo.eval.grid`` says
which and why; ``zoo.eval.protocol_module.ProtocolHeads`` shares one frozen forward per batch between them). A pass
runs on the shared trainer (``zoo.train.trainer.build_trainer``) in ``DIR/protocol_pass_<lrs>``: ``last.ckpt`` at
every epoch end and on SIGTERM / SIGUSR1 (the process then exits 143 / 138), and rerunning the same ``zoo probe ...
--out DIR`` resumes it from there, said in one line. Without ``--out`` the pass lives in a temporary folder.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from zoo.eval.distributed import is_main_process
from zoo.eval.features import frozen_autocast
from zoo.eval.grid import PassResult, search_and_final
from zoo.eval.linear import divergence
from zoo.eval.probe_config import ProbeConfig
from zoo.eval.protocol_module import ProtocolHeads

__all__ = ["run_protocol", "pass_folder"]


def pass_folder(out: Path, grid_lrs: list[float], final_lrs: list[float]) -> Path:
    """The folder of the pass that trains these heads (its checkpoints)."""
    tag = hashlib.sha256(repr((list(grid_lrs), list(final_lrs))).encode()).hexdigest()[:10]
    return out / f"protocol_pass_{tag}"


def run_protocol(encoder: nn.Module, train_ds: Dataset, test_ds: Dataset, num_features: int, num_classes: int,
                 cfg: ProbeConfig, prepare_train: Callable, prepare_test: Callable, out: Path | None,
                 loader: Callable, split: Callable, points: Any, notices: Any, device: torch.device
                 ) -> dict[str, Any]:
    """The grid (finished points are not rerun, an edge is extended) and the final head, passes shared as
    ``zoo.eval.grid`` says; ``loader(ds, batch, prepare, sampler=None, trainer=None)`` builds the loaders."""
    from zoo.data.loaders import EpochShuffleSampler
    from zoo.train.trainer import build_trainer

    skipped: dict[str, set[str]] = {"train": set(), "test": set()}
    held = split(len(train_ds))[1] if len(cfg.lr_grid) > 1 else None
    scratch = tempfile.TemporaryDirectory(prefix="zoo-protocol-") if out is None else None
    root = Path(scratch.name) if scratch is not None else out

    def run_pass(grid_lrs: list[float], final_lrs: list[float]) -> PassResult:
        module = ProtocolHeads(encoder, num_features, num_classes, grid_lrs, final_lrs, cfg.batch_size, cfg.epochs,
                               prepare_train, prepare_test, cfg.seed, cfg.feature_norm,
                               held if grid_lrs else None, frozen_autocast(device, cfg.precision))
        folder = pass_folder(root, grid_lrs, final_lrs)
        kwargs: dict[str, Any] = dict(max_epochs=cfg.epochs, logger=False, num_sanity_val_steps=0,
                                      precision="32-true",  # the heads train in fp32; the frozen forward autocasts
                                      check_val_every_n_epoch=cfg.epochs, enable_progress_bar=cfg.progress,
                                      enable_model_summary=False, default_root_dir=str(folder))
        if device.type != "cuda":
            kwargs["accelerator"] = "cpu"
        if cfg.devices * cfg.num_nodes > 1:  # DDP over the probe's devices (gloo on CPUs)
            kwargs.update(devices=cfg.devices, num_nodes=cfg.num_nodes)
        trainer = build_trainer(**{**kwargs, **cfg.trainer})
        ckpt = folder / "checkpoints" / "last.ckpt"
        if ckpt.exists():
            notices.say(f"resuming the protocol pass of base lr {'/'.join(map(str, sorted(set(grid_lrs + final_lrs))))}"
                        f" from {ckpt}{_position(ckpt)}")
        if cfg.progress and trainer.is_global_zero:  # which pass the progress lines below belong to
            print(f"linear probe: one pass, {len(grid_lrs)} held-out grid head(s) {grid_lrs} and {len(final_lrs)} "
                  f"final head(s) {final_lrs}, {len(train_ds)} training images"
                  + (f" ({len(held)} held out of the grid heads)" if grid_lrs else ""), file=sys.stderr, flush=True)
        # padding places, not repeated images, fill a rank's share of the last batch (see ProtocolHeads)
        train_loader = loader(train_ds, cfg.batch_size, prepare_train,
                              EpochShuffleSampler(len(train_ds), cfg.seed, batch_size=cfg.batch_size,
                                                  mark_padding=True), trainer)

        def scored(ds: Dataset) -> Any:  # in order, split between the ranks without an image counted twice
            return loader(ds, cfg.extract_batch_size, prepare_test, EpochShuffleSampler(len(ds), shuffle=False,
                                                                                         mark_padding=True))

        val = ([scored(Subset(train_ds, held.tolist()))] if grid_lrs else []) + [scored(test_ds)]
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # no device banner / "fit stopped" lines for every pass
        try:
            with warnings.catch_warnings():
                # the frozen encoder is in eval mode on purpose (BN in inference mode); Lightning warns about it
                warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
                trainer.fit(module, train_loader, val, ckpt_path="auto")
                if not module.result:  # resumed from a checkpoint written after the last step, before scoring
                    trainer.validate(module, val, verbose=False)
        finally:
            lightning_log.setLevel(level)
        for name in skipped:
            skipped[name] |= module.skipped[name]
        heads = module.bank.finished()
        g = len(grid_lrs)
        return {"grid": {lr: (acc["top1"], divergence(h, h.last_loss, num_classes))
                         for lr, h, acc in zip(grid_lrs, heads[:g], module.result.get("heldout", []))},
                "final": {lr: {**acc, "diverged": divergence(h, h.last_loss, num_classes)}
                          for lr, h, acc in zip(final_lrs, heads[g:], module.result["test"])},
                "heads": heads}  # type: ignore[dict-item]  # the trained heads, for tests and benchmarks

    was_training = encoder.training
    try:
        res = search_and_final(cfg, points, notices, run_pass)
    finally:
        encoder.train(was_training)  # the caller's encoder comes back in the mode it was given in
        if scratch is not None:
            scratch.cleanup()
    if out is not None and is_main_process():  # every pass's result is in DIR/grid.json now: its checkpoints are spent
        for folder in out.glob("protocol_pass_*"):
            shutil.rmtree(folder, ignore_errors=True)
    return {**res, "skipped": skipped}


def _position(ckpt: Path) -> str:
    """``: epoch E, step S`` of a checkpoint (empty when it cannot be read: Lightning will say why)."""
    from zoo.weights.safe_load import safe_torch_load

    try:
        state = safe_torch_load(ckpt, map_location="cpu")
    except Exception:  # noqa: BLE001 - the resume itself reports a bad file
        return ""
    return f": epoch {state.get('epoch')}, step {state.get('global_step')}"
