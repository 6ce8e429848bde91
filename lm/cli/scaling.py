"""The command-line front of ``zoo scaling sweep|fit``: the parser only; ``lm.scaling.sweep`` runs once the arguments
are good.
"""
from __future__ import annotations

from typing import Any

from lm.cli.common import argv_or_sys, subcommand_args
from zoo.cli.errors import tool_parser


def build_parser() -> Any:
    """The ``zoo scaling sweep|fit`` parser."""
    ap = tool_parser("zoo scaling", "Scaling-law sweeps and fits (Chinchilla, routed).")
    sub = ap.add_subcommands(dest="cmd", required=True)
    sw = tool_parser("zoo scaling sweep", "Train the sweep's runs not yet in <out_dir>/runs.csv.")
    sw.add_argument("--config", required=True, help="sweep YAML, e.g. configs/scaling/stdlib_isoflop.yaml")
    sw.add_argument("--dry-run", action="store_true", help="print the planned runs and their FLOPs; train nothing")
    sw.add_argument("--limit", type=int, default=None, help="train at most this many runs now")
    sw.add_argument("--out-dir", default=None, help="override the config's out_dir")
    sub.add_subcommand("sweep", sw, help="train the sweep's runs not yet in <out_dir>/runs.csv")
    ft = tool_parser("zoo scaling fit", "Fit a scaling law to a runs CSV, print it and write plots.")
    ft.add_argument("csv", help="runs.csv written by `zoo scaling sweep`")
    # choices without a type (int() below): jsonargparse shows a type given with choices as "<function <lambda>..."
    ft.add_argument("--approach", choices=("1", "2", "3"), required=True,
                    help="1: training-curve envelope, 2: IsoFLOP parabolas, 3: parametric L(N, D)")
    ft.add_argument("--out", default=None, help="folder for the PNG plots (null: next to the CSV)")
    ft.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for Approach 3 std errors")
    ft.add_argument("--curves", default=None, help="training-curve folder for Approach 1 (null: <csv dir>/curves)")
    sub.add_subcommand("fit", ft, help="fit a scaling law to a runs CSV, print it and write plots")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Scaling-law sweeps (train a grid of model sizes) and fits (Chinchilla approaches 1-3).

    `zoo scaling sweep --config ...` / `zoo scaling fit runs.csv --approach 1|2|3 [--out DIR]`.
    """
    argv = argv_or_sys(argv)
    if argv and argv[0] == "scaling":
        argv = argv[1:]
    args = subcommand_args(build_parser(), argv, "scaling", "cmd")
    if args is None:
        return 2
    from lm.scaling.sweep import run_scaling

    return run_scaling(args)


if __name__ == "__main__":
    raise SystemExit(main())
