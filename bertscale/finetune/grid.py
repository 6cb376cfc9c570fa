"""A fine-tuning grid: one run per learning rate and seed, resumable.

A grid can be re-run in the same output folder: a run whose results.json is written is finished
and skipped; an unfinished one continues from its newest committed checkpoint
(bertscale.finetune.train). OUT/<task>/settings.json names the settings a folder's results
belong to; other settings are refused (or cleared with output.overwrite), so results of two
settings never mix.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.finetune.data import total_steps
from bertscale.finetune.recipe import FinetuneRecipe
from bertscale.finetune.results import RunResult, run_folder
from bertscale.finetune.runtime import Runtime
from bertscale.finetune.train import RunSpec
from bertscale.reporting import MetricSinks
from bertscale.seeding import seed_all
from bertscale.training.checkpoint.layout import checkpoints_dir


TrainOne = Callable[[RunSpec], tuple[dict[str, float], dict[str, Any]]]


def grid_settings(task: str, recipe: FinetuneRecipe, num_train: int,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a run's result besides its (lr, seed): two grids with equal settings can
    share an output folder, and their finished runs are interchangeable."""
    plain: dict[str, Any] = json.loads(json.dumps(
        {"task": task, **settings, "train_examples": num_train, "recipe": recipe.summary()},
        default=str))
    return plain


def check_output_dir(out_dir: Path, settings: Mapping[str, Any], overwrite: bool,
                     rt: Runtime) -> None:
    """A task folder holds the results of one setting: OUT/<task>/settings.json names it. Other
    settings are refused (or, with --overwrite, the folder is cleared) so that results of two
    settings never mix."""
    path = out_dir / "settings.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if _compared(old) != _compared(settings):
            if not overwrite:
                _refuse_other_weights(out_dir, old, settings)
                diff = _diff(_compared(old or {}), _compared(settings))
                raise UserError(
                    f"{out_dir} holds results of other settings ({diff}); use another "
                    f"--output-dir, or --overwrite to delete those results")
            if rt.is_main:
                shutil.rmtree(out_dir)
    elif overwrite and out_dir.is_dir() and rt.is_main:
        shutil.rmtree(out_dir)
    elif (out_dir / "runs").is_dir() and not overwrite:
        raise UserError(f"{out_dir} holds runs without a settings.json (an older bertscale); "
                        f"use another --output-dir, or --overwrite to delete them")
    rt.barrier()
    rt.write_json(path, settings)


# Settings that describe a grid without deciding its results: where the weights were read from
# (the same weights moved elsewhere give the same runs; their step and fingerprint decide).
_INFORMATIONAL = ("checkpoint",)


def _compared(settings: Any) -> Any:
    if not isinstance(settings, dict):
        return settings
    return {k: v for k, v in settings.items() if k not in _INFORMATIONAL}


def _refuse_other_weights(out_dir: Path, old: Any, new: Mapping[str, Any]) -> None:
    """One line when the grid's folder was fine-tuned from other pretrained weights than
    --checkpoint gives now (a run folder whose newest checkpoint moved on, another model):
    seeds of two checkpoints are never averaged together."""
    keys = ("checkpoint_step", "checkpoint_fingerprint")
    if (not isinstance(old, dict) or "checkpoint_fingerprint" not in old
            or all(old.get(k) == new.get(k) for k in keys)):
        return

    def what(s: Mapping[str, Any]) -> str:
        step = f"step {s.get('checkpoint_step')}, " if s.get("checkpoint_step") is not None else ""
        return (f"{s.get('checkpoint')} ({step}weights "
                f"{str(s.get('checkpoint_fingerprint'))[:12]})")
    raise UserError(f"{out_dir} holds runs fine-tuned from {what(old)}, but --checkpoint now "
                    f"gives {what(new)}; runs of two pretrained checkpoints are never averaged. "
                    f"Pass --checkpoint {old.get('checkpoint')} to continue this grid, or use "
                    f"another --output-dir (--overwrite deletes those results)")


def check_eval_dir(out_dir: Path) -> None:
    """--eval-only writes results.json and prediction files into OUT/<task>/: never into a
    grid's folder (it has settings.json), whose results it would replace."""
    if (out_dir / "settings.json").is_file():
        raise UserError(f"{out_dir} holds the results of a fine-tuning grid; give --eval-only "
                        f"another --output-dir")


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(out)


def run_grid(task: str, out_dir: Path, recipe: FinetuneRecipe, num_train: int, unit: str,
             train_one: TrainOne, settings: Mapping[str, Any], rt: Runtime) -> list[RunResult]:
    """One run per (learning rate, seed) of `recipe.train`: seed everything, then
    `train_one(run)` builds its model, trains, predicts, writes its prediction files into
    `run.folder` and returns (dev metrics, training stats); the run's results.json is written
    here and marks it finished: a re-run of the grid in the same folder skips it, and continues
    an unfinished run from its newest committed checkpoint. The model is local to `train_one`,
    so one run's weights are freed before the next is built. A finished run keeps no
    checkpoint."""
    t = recipe.train
    check_output_dir(out_dir, grid_settings(task, recipe, num_train, settings),
                     recipe.output.overwrite, rt)
    runs: list[RunResult] = []
    for lr in t.lr:
        for seed in t.seeds:
            folder = run_folder(out_dir, lr, seed)
            done = folder / "results.json"
            if done.is_file():
                prev = json.loads(done.read_text(encoding="utf-8"))
                rt.log(f"{task}: lr {lr:g} seed {seed}: finished earlier ({done}); skipped")
                runs.append(RunResult(lr, seed, prev["metrics"], folder, prev["train"]))
                continue
            uncapped = total_steps(t.epochs, t.batch_size, num_train)
            steps = total_steps(t.epochs, t.batch_size, num_train, t.max_steps)
            plan = (f"{t.epochs:g} epochs = {uncapped} steps" if steps == uncapped else
                    f"{steps} steps (--max-steps; {t.epochs:g} epochs would be {uncapped})")
            rt.log(f"{task}: lr {lr:g} seed {seed}: {num_train} {unit}, {plan}, batch "
                   f"{t.batch_size}")
            lg = recipe.logging
            sinks = MetricSinks(folder, enabled=rt.is_main, wandb=lg.wandb,
                                tensorboard=lg.tensorboard, project="bertscale-finetune",
                                name=f"{task}-lr{lr:g}-seed{seed}", group=task,
                                wandb_config={"task": task, "lr": lr, "seed": seed,
                                              **recipe.summary()},
                                warn=lambda m: rt.log(f"warning: {m}"))
            seed_all(seed)
            try:
                metrics, stats = train_one(RunSpec(folder, f"{task} lr {lr:g} seed {seed}", lr,
                                                   seed, sinks))
                sinks.record("eval", stats["steps"], metrics)
            finally:
                sinks.close()
            rt.write_json(done, {"task": task, "lr": lr, "seed": seed, "metrics": metrics,
                                 "train": stats, **{k: v for k, v in settings.items()
                                                    if k.startswith("checkpoint")}})
            if rt.is_main:    # finished: its checkpoints are of no more use
                shutil.rmtree(checkpoints_dir(folder), ignore_errors=True)
            runs.append(RunResult(lr, seed, metrics, folder, stats))
    return runs
