"""The multimodal demo: does a BYOL-pretrained encoder help a small decoder see? Up to three rows, one table.

    python -m lm.evals.multimodal_demo --config configs/multimodal/digits_vlm.yaml

1. A short BYOL pretraining on the digits (configs/byol/digits.yaml's model and views, ``--byol-epochs`` epochs),
   run through the ``zoo fit`` command (lm does not import byol), unless its checkpoint exists already.
2. The config's multimodal run per row, same seed and steps: the BYOL encoder frozen, the same architecture at
   random init frozen, and (``--rows 0,1,2``) the random-init encoder trained end to end with the decoder.
3. Answer accuracy (greedy generation, exact match) on held-out images, per task and overall, printed side by side.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lm.modules.multimodal import MultimodalLM
from zoo.data.interleaved import TASKS, InterleavedDataModule
from zoo.train.trainer import build_trainer

ROWS = (("BYOL-pretrained, frozen", True, "frozen"), ("random init, frozen", False, "frozen"),
        ("random init, end to end", False, "full"))


def pretrain_byol(config: str, epochs: int, root: str) -> str:
    """Run ``zoo fit`` on the BYOL config for ``epochs`` epochs into ``root``; the path of its last checkpoint."""
    ckpt = os.path.join(root, "checkpoints", "last.ckpt")
    if os.path.isfile(ckpt):
        print(f"BYOL encoder: reusing {ckpt}")
        return ckpt
    # the `zoo` console script of this environment (a child process; this library module does not import the front)
    zoo = os.path.join(os.path.dirname(sys.executable), "zoo")
    cmd = [zoo if os.path.isfile(zoo) else "zoo", "fit", "--config", config, f"--trainer.max_epochs={epochs}",
           f"--trainer.default_root_dir={root}", f"--trainer.check_val_every_n_epoch={epochs}",
           "--trainer.enable_progress_bar=false"]
    print("BYOL pretraining: zoo", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"the BYOL run wrote no {ckpt}; see its output above")
    return ckpt


def train_row(cfg: dict[str, Any], root: str, encoder_weights: str | None, train_encoder: str,
              steps: int | None) -> dict[str, dict[str, float]]:
    """Train one multimodal run from the config and return its answer accuracy on the held-out sequences."""
    pl.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    args = dict(cfg["model"]["init_args"])
    args["model_overrides"] = {**(args.get("model_overrides") or {}), "train_encoder": train_encoder}
    args["encoder_weights"] = encoder_weights
    lit = MultimodalLM(**args)
    dm = InterleavedDataModule(**cfg["data"]["init_args"])
    trainer_args = {**cfg["trainer"], "default_root_dir": root, "enable_progress_bar": False, "logger": False,
                    "enable_model_summary": False, "limit_val_batches": 0}
    if steps is not None:
        trainer_args["max_steps"] = steps
    build_trainer(**trainer_args).fit(lit, dm, overwrite=True)  # each demo run retrains its rows from scratch
    return lit.answer_accuracy([dm.val_set[i] for i in range(len(dm.val_set))], dm.tokenizer)


def format_table(rows: list[tuple[str, dict[str, dict[str, float]], float]]) -> str:
    """A Markdown table: one row per encoder, answer accuracy (%) per task and overall, training time."""
    head = "| encoder | " + " | ".join(TASKS) + " | all | train s |"
    lines = [head, "|" + "---|" * (len(TASKS) + 3)]
    for name, rep, secs in rows:
        cells = [f"{100 * rep[t]['accuracy']:.1f}" if t in rep else "-" for t in (*TASKS, "all")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
    n = rows[0][1]["all"]["total"] if rows else 0
    return "\n".join(lines) + f"\n(answer accuracy in %, exact match, {n} held-out sequences)"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: pretrain BYOL, train the chosen rows, print the table."""
    ap = argparse.ArgumentParser(prog="python -m lm.evals.multimodal_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/multimodal/digits_vlm.yaml")
    ap.add_argument("--byol-config", default="configs/byol/digits.yaml")
    ap.add_argument("--byol-epochs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=None, help="multimodal training steps per row (default: config)")
    ap.add_argument("--rows", default="0,1", help="which rows to run (0 BYOL, 1 random frozen, 2 end to end: adds ~2 min)")
    args = ap.parse_args(argv)
    from zoo.train.quiet import quiet_lightning

    quiet_lightning()  # the rows train in this process: no Lightning tips or availability lines, as under `zoo`
    cfg = yaml.safe_load(Path(args.config).read_text())
    root = cfg["trainer"].get("default_root_dir", "runs/multimodal/digits_vlm")
    byol_ckpt = cfg["model"]["init_args"].get("encoder_weights") or "runs/multimodal/byol_digits/checkpoints/last.ckpt"
    rows = []
    start = time.perf_counter()
    for k in (int(r) for r in args.rows.split(",")):
        name, pretrained, mode = ROWS[k]
        weights = None
        if pretrained:
            weights = pretrain_byol(args.byol_config, args.byol_epochs, str(Path(byol_ckpt).parent.parent))
        t0 = time.perf_counter()
        rep = train_row(cfg, os.path.join(root, f"row{k}"), weights, mode, args.steps)
        rows.append((name, rep, time.perf_counter() - t0))
        print(f"{name}: answer accuracy {100 * rep['all']['accuracy']:.1f}%", flush=True)
    print(f"\nHeld-out answer accuracy after {args.steps or cfg['trainer']['max_steps']} steps per row "
          f"(total {time.perf_counter() - start:.0f} s):\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
