"""Shared bits of the benchmarks: device pick, timing with synchronisation, table + JSON output."""
from __future__ import annotations

import json
import platform
import time
from datetime import date
from typing import Any, Callable

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are real."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: str) -> float:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def machine(device: str) -> str:
    """A short name of the machine the numbers come from."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def report(title: str, rows: list[tuple[str, float, str]], result: dict[str, Any], out: str | None = None) -> None:
    """Print a table and one JSON line (ratio last), and optionally write the JSON to ``out``."""
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"  {name:<{width}}  {value:>12.2f} {unit}")
    result = {"date": date.today().isoformat(), **result}
    line = json.dumps(result)
    print(line)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
