"""The Lightning half of `zoo`: LightningCLI over ``ZooTrainer`` for fit / validate / test / predict.

Imported only when one of those subcommands runs (it pulls in torch and Lightning), never for ``zoo --help``.
"""
from __future__ import annotations

import argparse
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from zoo.cli.commands import LIGHTNING_COMMANDS
from zoo.cli.errors import ConfigError, explain_parse_error
from zoo.train.quiet import quiet_lightning
from zoo.train.trainer import RunSummary, ZooTrainer, trainer_defaults

GROUP_TITLES = {
    "model": "Model: a LightningModule class path, as in configs/ (--model.help CLASS)",
    "data": "Data: a LightningDataModule class path (--data.help CLASS)",
}


class ZooCLI(LightningCLI):
    """LightningCLI with refused abbreviations and one-line configuration errors.

    The shared trainer defaults come from ``trainer_class=ZooTrainer`` (which completes its own arguments), so no
    private LightningCLI method is overridden; only the public ``init_parser`` and ``parse_arguments`` hooks are.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, refusing abbreviated keys and raising instead of printing usage on an error."""
        # `--trainer.max_epoch 1` must not silently mean max_epochs: abbreviations are refused.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Section titles that say what to pass: Lightning's would be the first line of a docstring (cut mid-sentence
        for LightningDataModule) or a bare ``<class '...LightningModule'>``."""
        for key, title in GROUP_TITLES.items():
            if key in parser.groups:
                parser.groups[key].title = title

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (never ``sys.argv`` as well); a bad key or value becomes one ``ConfigError`` line."""
        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except argparse.ArgumentError as err:
            raise ConfigError(explain_parse_error(str(err), list(args or []))) from None


def _normalise_overwrite(args: list[str]) -> list[str]:
    """``--overwrite`` alone means ``--overwrite true`` (ZooTrainer.fit's flag)."""
    return [a if a != "--overwrite" or (i + 1 < len(args) and args[i + 1].lower() in ("true", "false"))
            else "--overwrite=true" for i, a in enumerate(args)]


def run_cli(args: list[str], run: bool = True) -> ZooCLI:
    """Build (and by default run) the Lightning part of ``zoo`` on ``args`` (the command line after ``zoo``)."""
    quiet_lightning()
    args = _normalise_overwrite(list(args))
    return ZooCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=ZooTrainer,  # checks batch / devices / model before DDP spawns anything; adds our callbacks
        # RunSummary through LightningCLI's public trainer_defaults: added to the config's callbacks, so every
        # `zoo fit` ends by naming its outputs (and an interrupted one by the command that resumes it)
        trainer_defaults={**trainer_defaults(), "callbacks": [RunSummary(["zoo", *args])]},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "zoo",  # not "__main__.py" under python -m zoo.cli
                       "description": "byol-zoo: pretraining, evaluation and export (zoo --help lists every "
                                      "subcommand)",
                       **{name: {"description": text} for name, text in LIGHTNING_COMMANDS.items()}},
        args=args,
        run=run,
    )
