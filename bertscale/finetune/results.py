"""A grid's results: mean and sample standard deviation over seeds for each learning rate, the
chosen learning rate (the best mean of the task's main metric on dev, as the paper picks it), the
lr x seed table and the console line, and the chosen run's prediction files published to the
task folder."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertscale.files import copy_atomic
from bertscale.finetune.recipe import FinetuneRecipe
from bertscale.finetune.runtime import Runtime


def run_folder(out_dir: Path, lr: float, seed: int) -> Path:
    return out_dir / "runs" / f"lr{lr:g}-seed{seed}"


@dataclass
class RunResult:
    """One (learning rate, seed) run: its dev metrics and where its files are."""

    lr: float
    seed: int
    metrics: dict[str, float]
    folder: Path
    train: dict[str, Any] = field(default_factory=dict)


def summarize(task: str, main_metric: str, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds for every learning rate; the best
    learning rate is the one with the highest mean of `main_metric`, and its best seed's
    predictions are the task's predictions."""
    by_lr: dict[float, list[RunResult]] = {}
    for r in runs:
        by_lr.setdefault(r.lr, []).append(r)
    per_lr: dict[float, dict[str, dict[str, float | None]]] = {}
    means: dict[float, float] = {}
    for lr, rs in by_lr.items():
        names = [k for k in rs[0].metrics if all(k in r.metrics for r in rs)]
        per_lr[lr] = {k: {"mean": statistics.fmean(r.metrics[k] for r in rs),
                          # the spread of one run is undefined, not zero
                          "std": statistics.stdev(r.metrics[k] for r in rs) if len(rs) > 1 else None}
                      for k in names}
        means[lr] = statistics.fmean(r.metrics[main_metric] for r in rs)
    best_lr = max(means, key=lambda lr: means[lr])
    best_run = max(by_lr[best_lr], key=lambda r: r.metrics[main_metric])
    return {
        "task": task,
        "main_metric": main_metric,
        "best_lr": best_lr,
        "best_seed": best_run.seed,
        "metrics": per_lr[best_lr],
        "by_lr": {f"{lr:g}": m for lr, m in per_lr.items()},
        "runs": [{"lr": r.lr, "seed": r.seed, "metrics": r.metrics, "folder": r.folder.name,
                  **{f"train_{k}": v for k, v in r.train.items()}} for r in runs],
    }


def _pm(m: Mapping[str, Any], scale: float) -> str:
    """`88.1 ± 0.4`, or `88.1` for one run (whose spread is undefined)."""
    if m.get("std") is None:
        return f"{scale * m['mean']:.1f}"
    return f"{scale * m['mean']:.1f} ± {scale * m['std']:.1f}"


def console_line(summary: Mapping[str, Any], names: Sequence[str], seconds: float,
                 scale: float = 100.0) -> str:
    """`MRPC  f1 88.1 ± 0.4  accuracy 84.2 ± 0.5  (3 seeds, lr 2e-05, 412 s)`; one seed shows
    no spread."""
    parts = [summary["task"]]
    for n in names:
        m = summary["metrics"].get(n)
        if m is not None:
            parts.append(f"{n} {_pm(m, scale)}")
    seeds = sum(1 for r in summary["runs"] if r["lr"] == summary["best_lr"])
    parts.append(f"({seeds} seed{'s' if seeds != 1 else ''}, lr {summary['best_lr']:g}, "
                 f"{seconds:.0f} s)")
    return "  ".join(parts)


def grid_table(summary: Mapping[str, Any], names: Sequence[str], scale: float = 100.0) -> str:
    """The lr x seed table: one row per learning rate, the first metric of every seed, then
    mean ± std of each metric; `*` marks the chosen learning rate."""
    names = [n for n in names if n in summary["metrics"]] or [summary["main_metric"]]
    seeds = sorted({r["seed"] for r in summary["runs"]})
    head = ["", "lr"] + [f"seed {s}" for s in seeds] + list(names)
    rows = [head]
    for lr_text, per in summary["by_lr"].items():
        lr = float(lr_text)
        by_seed = {r["seed"]: r for r in summary["runs"] if r["lr"] == lr}
        cells = ["*" if lr == summary["best_lr"] else "", lr_text]
        cells += [f"{scale * by_seed[s]['metrics'][names[0]]:.1f}" if s in by_seed else "-"
                  for s in seeds]
        cells += [_pm(per[n], scale) if n in per else "-" for n in names]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    n_seeds = len(seeds)
    title = (f"{summary['task']} dev {names[0]} per seed; mean"
             + (" ± std" if n_seeds > 1 else "") + f" over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
             + f" (x{scale:g})" * (scale != 1))
    foot = (f"* best mean {summary['main_metric']}: lr {summary['best_lr']:g}; its seed "
            f"{summary['best_seed']} run's predictions are published")
    return "\n".join([title, *lines, foot])


def finish(task: str, main_metric: str, runs: Sequence[RunResult], out_dir: Path,
           files: Iterable[str], recipe: FinetuneRecipe, rt: Runtime, started: float,
           names: Sequence[str], scale: float = 100.0, **extra: Any) -> dict[str, Any]:
    """Summarise the grid, publish the chosen run's prediction files, write the task's
    results.json and print its lr x seed table and console line; returns the summary."""
    summary = summarize(task, main_metric, runs)
    best = run_folder(out_dir, summary["best_lr"], summary["best_seed"])
    published = publish(best, out_dir, files, rt)
    summary.update(extra, recipe=recipe.summary(), recipe_name=recipe.name,
                   predictions=[p.name for p in published], world_size=rt.world_size,
                   seconds=time.perf_counter() - started)
    rt.write_json(out_dir / "results.json", summary)
    if rt.is_main:
        print(grid_table(summary, names, scale), flush=True)
        print(console_line(summary, names, summary["seconds"], scale), flush=True)
    return summary


def publish(best_folder: Path, out_dir: Path, names: Iterable[str], rt: Runtime) -> list[Path]:
    """Copy the chosen run's prediction files up to the task folder (atomically; rank 0)."""
    copied: list[Path] = []
    if not rt.is_main:
        return copied
    for name in names:
        src = best_folder / name
        if src.is_file():
            copy_atomic(src, out_dir / name)
            copied.append(out_dir / name)
    return copied
