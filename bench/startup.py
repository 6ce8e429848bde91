"""`zoo` start-up time: ``zoo --help`` and each subcommand's ``--help`` against ``python -c "import torch"``.

Each command runs in a fresh interpreter (the median of ``--repeat`` runs). The floor is the time to import torch,
which any command that trains or evaluates must pay; help that needs no torch should come in well under it.
Lightning's subcommands (fit / validate / test / predict) are timed on the first call (an empty help cache in a
temporary ``ZOO_CACHE_DIR``: the text shipped in ``zoo/cli/help/`` answers) and a later, cached call
(``zoo.cli.help_cache``); ``fit`` also live (both stores off: what rendering with Lightning costs) and with a
``--config`` (not shipped, so its first call renders live). The machine's load average is printed with the
table, since it moves every number.
Prints a table (seconds, ratio to the floor) and one JSON line. Run from the repository root:

    python bench/startup.py [--repeat 3] [--budget 1.5] [--only fit eval]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = ("fit", "validate", "test", "predict")
TOOLS = ("probe", "export", "export-hf", "eval", "eval ppl", "eval needle", "scaling", "plan", "consolidate")


def seconds(argv: list[str], repeat: int, env: dict[str, str] | None = None, before: list[str] | None = None
            ) -> tuple[float, int]:
    """Median wall-clock seconds of running ``argv`` ``repeat`` times (each after running ``before``, untimed),
    and the last exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    times, code = [], 0
    for _ in range(repeat):
        if before:
            subprocess.run(before, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    py, zoo = sys.executable, [sys.executable, "-m", "zoo.cli"]
    load_before = os.getloadavg()[0]
    floor, _ = seconds([py, "-c", "import torch"], a.repeat)
    rows = [("python -c 'import torch' (floor)", floor, 0)]
    rows.append(("zoo --help", *seconds([*zoo, "--help"], a.repeat)))
    names = a.only if a.only is not None else [*LIGHTNING, *TOOLS]
    with tempfile.TemporaryDirectory() as cache:
        for name in names:
            cmd = [*zoo, *name.split(), "--help"]
            if name in LIGHTNING:
                # first call: the user's cache emptied before each timed run, so the shipped text (zoo/cli/help/)
                # answers; cached: the same call again; live: both stores off, what Lightning alone costs
                clear = [py, "-c", f"import shutil; shutil.rmtree({str(Path(cache) / 'help')!r}, ignore_errors=True)"]
                env = {"ZOO_CACHE_DIR": cache, "COLUMNS": "80"}
                rows.append((f"zoo {name} --help (first call)", *seconds(cmd, a.repeat, env, before=clear)))
                rows.append((f"zoo {name} --help (cached)", *seconds(cmd, a.repeat, env)))
                if name == "fit":
                    rows.append(("zoo fit --help (live, ZOO_HELP_CACHE=0)",
                                 *seconds(cmd, a.repeat, {**env, "ZOO_HELP_CACHE": "0"})))
                    config = [*cmd[:-1], "--config", "configs/byol/digits.yaml", "--help"]
                    rows.append(("zoo fit --config digits.yaml --help (1st)",
                                 *seconds(config, a.repeat, env, before=clear)))
            else:
                rows.append((f"zoo {name} --help", *seconds(cmd, a.repeat)))
    load = (load_before, os.getloadavg()[0])
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.1f} before / {load[1]:.1f} after")
    print(f"{'command':<44}{'seconds':>9}{'x floor':>9}  within {a.budget:g} s")
    for label, s, code in rows:
        status = "" if code == 0 else f"  (exit {code})"
        print(f"{label:<44}{s:>9.2f}{s / floor:>9.2f}  {'yes' if s <= a.budget else 'no'}{status}")
    print(json.dumps({"bench": "startup", "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in load],
                      "floor_import_torch_s": round(floor, 3), "budget_s": a.budget,
                      "commands": {label: {"s": round(s, 3), "ratio": round(s / floor, 3), "exit": code}
                                   for label, s, code in rows[1:]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
