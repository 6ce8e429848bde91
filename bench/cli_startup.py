"""`zoo` start-up time: ``zoo --help`` and each subcommand's ``--help`` against ``python -c "import torch"``.

Each command runs in a fresh interpreter (the median of ``--repeat`` runs). The floor is the time to import torch,
which any command that trains or evaluates must pay; help that needs no torch should come in well under it.
Prints a table (seconds, ratio to the floor) and one JSON line. Run from the repository root:

    python bench/cli_startup.py [--repeat 3] [--budget 1.5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("fit", "validate", "test", "predict", "probe", "export", "export-hf", "eval", "scaling", "plan")


def seconds(argv: list[str], repeat: int) -> tuple[float, int]:
    """Median wall-clock seconds of running ``argv`` ``repeat`` times, and its last exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times, code = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), code


def main(argv: list[str] | None = None) -> int:
    """Measure and print; exit 0 (the budget is reported, not enforced)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per command (median reported)")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds a --help should take at most")
    ap.add_argument("--only", nargs="*", default=None, help="subcommands to time (default: all)")
    a = ap.parse_args(argv)
    py = sys.executable
    floor, _ = seconds([py, "-c", "import torch"], a.repeat)
    rows = [("python -c 'import torch' (floor)", floor, 0)]
    rows.append(("zoo --help", *seconds([py, "-m", "zoo.cli", "--help"], a.repeat)))
    for name in a.only if a.only is not None else SUBCOMMANDS:
        rows.append((f"zoo {name} --help", *seconds([py, "-m", "zoo.cli", name, "--help"], a.repeat)))
    print(f"{'command':<36}{'seconds':>9}{'x floor':>9}  within {a.budget:g} s")
    for label, s, code in rows:
        status = "" if code == 0 else f"  (exit {code})"
        print(f"{label:<36}{s:>9.2f}{s / floor:>9.2f}  {'yes' if s <= a.budget else 'no'}{status}")
    print(json.dumps({"bench": "cli_startup", "floor_import_torch_s": round(floor, 3), "budget_s": a.budget,
                      "commands": {label: {"s": round(s, 3), "ratio": round(s / floor, 3), "exit": code}
                                   for label, s, code in rows[1:]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
