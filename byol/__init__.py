"""BYOL: the LightningModule (heads, target, loss on the shared image-pretraining base) and its pure functions.

LARS, the MLP head builder and the lr scaling rule are the shared kit (``zoo.train.optim``, ``zoo.models.heads``),
re-exported here under the names they had when they lived in this package.
"""
from byol.functional import byol_loss, lr_schedule, regression_loss, tau_schedule
from byol.module import BYOL
from zoo.eval.probe_report import ProbeReport  # kept importable as byol.ProbeReport for existing configs
from zoo.models.heads import mlp_head
from zoo.train.optim import LARS, lars_param_groups, scaled_lr

__all__ = ["BYOL", "LARS", "ProbeReport", "byol_loss", "lars_param_groups", "lr_schedule", "mlp_head", "regression_loss",
           "scaled_lr", "tau_schedule"]
