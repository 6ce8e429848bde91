"""The lr grid of the linear probe, the same for fast and protocol mode: which heads a pass trains, the held-out pick,
the edge extension, and the final head.

One pass trains, for every base lr it is given, a *grid head* on train minus the held-out images and a *final head* on
all of train, on the same batches (one read of the features, or one frozen-encoder forward, per batch): the held-out
rows ride along in each batch and only the grid heads leave them out. The protocol (BYOL's linear evaluation) picks
the lr on the held-out images, then retrains on all of train with it; the final head's lr is known only after the grid
has been scored, so training one final head per candidate lr in the same pass is the only way it can share the pass.
A head costs a linear layer's step (~0.05 % of a ResNet-50 forward at 1000 classes), so the whole grid plus its finals
costs about one pass instead of k + 1. The pick reads only the held-out scores; the other finals' test scores are kept
in ``DIR/grid.json`` for a resume, never reported or used. A grid extended past its edge (``grid_extensions``) is one
more pass for the new lrs; a one-lr grid is one pass with its final head only.
"""
from __future__ import annotations

from typing import Any, Callable

from zoo.eval.probe_config import ProbeConfig
from zoo.eval.rundir import GridPoints

__all__ = ["pick", "edge", "grid_search", "search_and_final", "PassResult"]

# run_pass(grid_lrs, final_lrs) -> {"grid": {lr: (held-out top-1, diverged)}, "final": {lr: {top1, top5, diverged}}}
PassResult = dict[str, dict[float, Any]]


def pick(grid: dict[str, float], diverged: dict[str, str]) -> float:
    """The best base lr on the held-out images; a diverged lr is never picked (unless every lr diverged)."""
    return float(max(grid, key=lambda lr: (lr not in diverged, grid[lr])))


def edge(grid: dict[str, float], diverged: dict[str, str]) -> str | None:
    """'top' / 'bottom' when the best lr is the highest / lowest of the grid and strictly better than its neighbour
    (a tie says nothing about what lies beyond)."""
    lrs = sorted((float(k) for k in grid if k not in diverged))
    if len(lrs) < 2:
        return None
    best = pick(grid, diverged)
    score = {float(k): v for k, v in grid.items()}
    if best == lrs[-1] and score[lrs[-1]] > score[lrs[-2]]:
        return "top"
    if best == lrs[0] and score[lrs[0]] > score[lrs[1]]:
        return "bottom"
    return None


def grid_search(cfg: ProbeConfig, points: GridPoints, score: Callable[[list[float]], None], notices: Any
                ) -> tuple[dict[str, float], dict[str, str], list[float]]:
    """Score the lr grid (``score(lrs)`` trains and records points; finished points are not rerun), then, while the
    best lr sits at an edge of the grid and beats its neighbour, extend past it (x2 / x0.5, at most
    ``cfg.grid_extensions`` times); announce either. Same for every mode, so fast and protocol pick alike."""
    lrs_all = list(cfg.lr_grid)
    if points.resumed:
        notices.say(f"resuming the lr grid: {points.resumed} point(s) already scored, in {points.path}")
    grid: dict[str, float] = {}
    diverged: dict[str, str] = {}
    extended: list[float] = []

    def collect(todo: list[float]) -> None:
        if todo:
            score(todo)
        for lr in lrs_all:
            grid[str(lr)] = points.points[str(lr)]["top1"]
            if points.points[str(lr)]["diverged"]:
                diverged[str(lr)] = points.points[str(lr)]["diverged"]

    collect([lr for lr in lrs_all if str(lr) not in points.points])
    side = edge(grid, diverged)
    for _ in range(cfg.grid_extensions):
        if side is None:
            break
        new = pick(grid, diverged) * (2.0 if side == "top" else 0.5)
        lrs_all.append(new)
        extended.append(new)
        collect([] if str(new) in points.points else [new])
        side = edge(grid, diverged)
    best = pick(grid, diverged)
    if extended:
        notices.say(f"the best base lr was at the edge of lr_grid {list(cfg.lr_grid)}: extended it with {extended} "
                    f"(best {best:g}{f'; still at the {side}: widen --lr_grid' if side else ''})")
    elif side:
        notices.say(f"the best base lr {best:g} is at the {side} of lr_grid {list(cfg.lr_grid)}: the optimum may lie "
                    f"{'above' if side == 'top' else 'below'}; widen --lr_grid, or pass --grid_extensions 2 to extend it")
    return grid, diverged, extended


def search_and_final(cfg: ProbeConfig, points: GridPoints, notices: Any,
                     run_pass: Callable[[list[float], list[float]], PassResult]) -> dict[str, Any]:
    """The grid (when it has more than one lr) and the final head of the pick, passes shared as the module says;
    finished points and finals are read from ``points`` instead of being trained again."""
    grid: dict[str, float] = {}
    diverged: dict[str, str] = {}
    extended: list[float] = []
    if len(cfg.lr_grid) > 1:
        def score(lrs: list[float]) -> None:
            res = run_pass(lrs, lrs)
            for lr in lrs:
                points.add(lr, *res["grid"][lr], final=res["final"][lr])

        grid, diverged, extended = grid_search(cfg, points, score, notices)
    best = pick(grid, diverged) if grid else cfg.lr_grid[0]
    final = points.final(best)
    if final is None:  # a one-lr grid, or points written before finals shared the pass
        final = run_pass([], [best])["final"][best]
        points.add_final(best, final)
    if final["diverged"]:
        diverged["final"] = final["diverged"]
    return {"top1": final["top1"], "top5": final["top5"], "base_lr": best, "heldout_top1": grid,
            "diverged": diverged, "grid_extended": extended}
