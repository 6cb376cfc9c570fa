"""Running the benchmark's stages and the commands in them, and reading a pretraining run back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import write_json_atomic

GLUE_TASKS = ("CoLA", "MRPC", "RTE", "STS-B")
MODELS = ("bertscale", "transformers", "random_init")
MODEL_LABELS = {"bertscale": "(a) bertscale pretrained", "transformers": "(c) transformers pretrained",
                "random_init": "(b) random init"}
DEFAULT_RECIPE = "quality_mini"


def log(msg: str) -> None:
    """One line of the benchmark's progress on stderr."""
    print(f"bench quality: {msg}", file=sys.stderr, flush=True)


def run_stage(out: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stage's result: read back when OUT/stages/<name>.json exists, else computed and
    written atomically (a stage that dies leaves no file and runs again)."""
    path = out / "stages" / f"{name}.json"
    if path.is_file():
        log(f"stage {name}: done earlier, skipped ({path})")
        return json.loads(path.read_text())
    log(f"stage {name}: running")
    t0 = time.time()
    result = fn()
    result.update(stage_seconds=round(time.time() - t0, 2), finished_at=round(time.time(), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    log(f"stage {name}: finished in {result['stage_seconds']:.1f} s")
    return result


def bertscale_command() -> list[str]:
    """The `bertscale` console script of this interpreter's environment (PATH as a fallback)."""
    beside = Path(sys.executable).parent / "bertscale"
    found = str(beside) if beside.is_file() else shutil.which("bertscale")
    if not found:
        raise UserError("the `bertscale` command is not installed beside this Python nor on PATH")
    return [found]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    import torch
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_command(args: list[str], threads: int, log_file: Path) -> None:
    """Run a bertscale command, its output appended to log_file; a failure names the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ bertscale {' '.join(args)}  (log: {log_file})")
    with open(log_file, "a", encoding="utf-8") as f:
        rc = subprocess.call(bertscale_command() + args, env=child_env(threads), stdout=f,
                             stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise UserError(f"`bertscale {args[0]}` failed (exit {rc}); see {log_file}:\n{tail}")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing; the pretraining run wrote no metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_tokens(record: dict[str, Any]) -> int:
    """Real tokens of one logged step (the trainer logs tokens_per_s and step_time_s)."""
    return round(record["tokens_per_s"] * record["step_time_s"])


def bertscale_curve(run_dir: Path) -> dict[str, Any]:
    """Held-out points and per-step stats from a `bertscale pretrain` run's metrics.jsonl."""
    records = read_metrics(run_dir)
    train = {r["step"]: r for r in records if r["kind"] == "train"}  # the last record of a step wins
    steps = sorted(train)
    if steps != list(range(1, len(steps) + 1)):
        raise UserError(f"{run_dir}/metrics.jsonl: steps are not all logged (logging.every must be 1)")
    cum_s, cum_tok, curve = [0.0], [0], []
    for s in steps:
        cum_s.append(cum_s[-1] + train[s]["step_time_s"])
        cum_tok.append(cum_tok[-1] + step_tokens(train[s]))
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    for s in sorted(evals):
        e = evals[s]
        curve.append(dict(step=s, train_s=cum_s[s], tokens=cum_tok[s], mlm_loss=e["mlm_loss"],
                          mlm_acc=e["mlm_acc"], eval_samples=int(e["samples"])))
    return dict(curve=curve, steps=len(steps), train_s=cum_s[-1], tokens=cum_tok[-1],
                tokens_per_step=[step_tokens(train[s]) for s in steps],
                step_time_s=[train[s]["step_time_s"] for s in steps])
