"""The Lightning internals zoo still relies on, checked by name so that a new Lightning release fails here, loudly.

pyproject.toml bounds ``lightning<2.7``. Before raising the bound, run this file against the new release; each
failure names the internal and the zoo code that uses it.

- ``Trainer._signal_connector`` (a ``_SignalConnector`` with ``register_signal_handlers``, ``_sigterm_notifier_fn``
  and ``received_sigterm``): ``zoo.train.trainer.DeferredSignalConnector`` defers SIGTERM to a well-defined batch
  end (Lightning has no public hook to defer the signal or to set ``received_sigterm``).
- ``trainer.fit_loop.epoch_progress.current.processed`` / ``.started`` and
  ``fit_loop.epoch_loop.batch_progress.current.processed``: ``zoo.data.loaders.fit_progress`` / ``fit_position``
  (where a training loader starts, and the data position a mid-epoch checkpoint stores; the public
  ``trainer.current_epoch`` / ``global_step`` count completed epochs / optimizer steps, not batches trained on).
- ``LightningCLI._parse_ckpt_path`` (called from ``__init__``, reads ``--ckpt_path`` with ``torch.load``):
  ``zoo.cli.lightning.ZooCLI`` overrides it so the safe loader reads the file first.
"""
from __future__ import annotations

import inspect

import lightning
import pytest
from lightning.pytorch import Trainer

from zoo.data.loaders import fit_progress
from zoo.train.trainer import DeferredSignalConnector, ZooTrainer, sigterm_pending


def _need(ok: bool, what: str, user: str) -> None:
    if not ok:
        pytest.fail(f"lightning {lightning.__version__} changed the internal {what}, which {user} relies on; adapt it "
                    "or keep lightning below this version in pyproject.toml")


def test_signal_connector_internals_are_as_zoo_expects():
    from lightning.pytorch.trainer.connectors import signal_connector

    base = getattr(signal_connector, "_SignalConnector", None)
    _need(base is not None, "lightning.pytorch.trainer.connectors.signal_connector._SignalConnector",
          "zoo.train.trainer.DeferredSignalConnector")
    for name in ("register_signal_handlers", "_sigterm_notifier_fn", "teardown"):
        _need(callable(getattr(base, name, None)), f"_SignalConnector.{name}", "DeferredSignalConnector")
    params = list(inspect.signature(base._sigterm_notifier_fn).parameters)
    _need(params[:2] == ["self", "signum"], "_SignalConnector._sigterm_notifier_fn(self, signum, frame)",
          "DeferredSignalConnector")
    trainer = ZooTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    connector = getattr(trainer, "_signal_connector", None)
    _need(isinstance(connector, DeferredSignalConnector), "Trainer._signal_connector (replaced in ZooTrainer)",
          "zoo.train.trainer.ZooTrainer")
    connector.register_signal_handlers()
    try:
        _need(hasattr(connector, "received_sigterm") and trainer.received_sigterm is False,
              "_SignalConnector.received_sigterm behind Trainer.received_sigterm", "PreemptionCheckpoint")
        connector.received_sigterm = True
        _need(trainer.received_sigterm is True, "Trainer.received_sigterm reading _signal_connector.received_sigterm",
              "PreemptionCheckpoint")
        assert sigterm_pending(trainer)
    finally:
        connector.teardown()


def test_fit_loop_progress_counters_are_as_zoo_expects():
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False)
    loop = trainer.fit_loop
    for path in ("epoch_progress.current.processed", "epoch_progress.current.started",
                 "epoch_loop.batch_progress.current.processed"):
        node = loop
        for part in path.split("."):
            _need(hasattr(node, part), f"trainer.fit_loop.{path}", "zoo.data.loaders.fit_progress")
            node = getattr(node, part)
        _need(isinstance(node, int), f"trainer.fit_loop.{path} (an int)", "zoo.data.loaders.fit_progress")
    epochs, batches, _ = fit_progress(trainer)
    assert (epochs, batches) == (0, 0)


def test_the_version_bound_in_pyproject_covers_the_installed_lightning():
    import re
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("lightning"))
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert upper, f"{spec!r}: zoo uses Lightning internals, so lightning needs an upper bound"
    installed = tuple(int(x) for x in lightning.__version__.split(".")[:2])
    assert installed < tuple(int(x) for x in upper.group(1).split(".")[:2]), (lightning.__version__, spec)


def test_cli_reads_ckpt_path_through_the_method_zoo_overrides():
    from lightning.pytorch.cli import LightningCLI

    from zoo.cli.lightning import ZooCLI

    _need(callable(getattr(LightningCLI, "_parse_ckpt_path", None))
          and "_parse_ckpt_path" in inspect.getsource(LightningCLI.__init__),
          "LightningCLI._parse_ckpt_path (called by __init__)", "zoo.cli.lightning.ZooCLI")
    assert ZooCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
