"""BYOL: the LightningModule (heads, targets, loss on the shared image-pretraining base), LARS, lr schedule."""
from byol.functional import byol_loss, lr_schedule, regression_loss, scaled_lr, tau_schedule
from byol.heads import mlp_head
from byol.lars import LARS, lars_param_groups
from byol.module import BYOL
from zoo.eval.probe_report import ProbeReport  # kept importable as byol.ProbeReport for existing configs

__all__ = ["BYOL", "LARS", "ProbeReport", "byol_loss", "lars_param_groups", "lr_schedule", "mlp_head", "regression_loss",
           "scaled_lr", "tau_schedule"]
