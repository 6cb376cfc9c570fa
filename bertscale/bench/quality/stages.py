"""`bertscale bench quality` as one resumable run: its settings, and one method per stage.

Stages, each skipped on a re-run once its result file OUT/stages/<stage>.json is written
(atomically): prepare (MLM-only shards: the comparison class, `transformers`' BertForMaskedLM as
`run_mlm` trains it, has no NSP); calibrate (each side's step count = budget / its median step
time); pretrain_bertscale and pretrain_transformers (the same batches, optimizer, schedule and
clipping; transformers_side.py); export and random_init (three Hugging Face folders); finetune_<model>
(`bertscale finetune glue` of each, one recipe for all three); then the report (report.py). What
is measured and its limits: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bertscale.bench.quality.report import main_metric, markdown, plot, targets
from bertscale.bench.quality.runs import (DEFAULT_RECIPE, GLUE_TASKS, MODELS, bertscale_command,
                                          bertscale_curve, child_env, log, read_metrics,
                                          run_command, run_stage)
from bertscale.bench.quality.transformers_side import TransformersSide, save_hf_folder
from bertscale.errors import UserError
from bertscale.files import write_json_atomic, write_text_atomic


@dataclass
class QualityConfig:
    """One `bertscale bench quality` run (`--out`); see the command's flags for each field."""

    data: list[Path]
    glue: Path
    out: Path
    vocab: Path | None = None
    train_vocab: int | None = None
    recipe: str = DEFAULT_RECIPE
    overrides: list[str] = field(default_factory=list)
    budget_min: float = 30.0
    calibrate_steps: int = 20
    evals: int = 10
    eval_samples: int = 1024
    prepare_workers: int = 2
    tasks: list[str] = field(default_factory=lambda: list(GLUE_TASKS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    lr: str = "1e-4"
    """Fine-tuning learning rate(s), a comma list passed to `bertscale finetune glue`."""
    epochs: float = 3
    batch_size: int = 32
    max_train_samples: int = 2000
    max_eval_samples: int = 0
    threads: int = 0
    """Torch threads for every stage; 0: the machine's cores."""

    def settings(self) -> dict[str, Any]:
        """The settings that decide the results (a re-run into the same --out must give the
        same), checked."""
        if (self.budget_min <= 0 or self.calibrate_steps < 2 or self.evals < 1
                or self.eval_samples < 1):
            raise UserError("--budget-min must be > 0, --calibrate-steps >= 2, --evals and "
                            "--eval-samples >= 1")
        for t in self.tasks:
            if not (self.glue / t / "train.tsv").is_file():
                raise UserError(f"--tasks {t}: {self.glue / t / 'train.tsv'} not found")
        for f in self.data:
            if not f.exists():
                raise UserError(f"--data {f}: no such file or folder")
        if self.vocab is not None and not self.vocab.is_file():
            raise UserError(f"--vocab {self.vocab}: no such file")
        return dict(data=[str(p.resolve()) for p in self.data], glue=str(self.glue.resolve()),
                    vocab=str(self.vocab.resolve()) if self.vocab else None,
                    train_vocab=self.train_vocab, recipe=self.recipe,
                    overrides=list(self.overrides), budget_min=self.budget_min,
                    calibrate_steps=self.calibrate_steps, evals=self.evals,
                    eval_samples=self.eval_samples, tasks=list(self.tasks),
                    seeds=list(self.seeds), lr=self.lr, epochs=self.epochs,
                    batch_size=self.batch_size, max_train_samples=self.max_train_samples,
                    max_eval_samples=self.max_eval_samples,
                    threads=self.threads or os.cpu_count() or 1)


def run(cfg: QualityConfig) -> dict[str, Any]:
    """The stages in order, each skipped when its result is on disk; the results."""
    run = QualityRun(cfg)
    prepared = run.stage("prepare", run.prepare)
    run.cal = cal = run.stage("calibrate", run.calibrate)
    log(f"calibrated: bertscale {cal['step_s']['bertscale']:.3f} s/step -> "
        f"{cal['steps']['bertscale']} steps; transformers {cal['step_s']['transformers']:.3f} "
        f"s/step -> {cal['steps']['transformers']} steps")
    pre = {"bertscale": run.stage("pretrain_bertscale", run.pretrain_bertscale),
           "transformers": run.stage("pretrain_transformers", run.pretrain_transformers)}
    run.stage("export", run.export)
    run.stage("random_init", run.random_init)
    glue_raw = {m: run.stage(f"finetune_{m}", partial(run.finetune, m)) for m in MODELS}
    return run.report(prepared, pre, glue_raw)


class QualityRun:
    """One benchmark folder (`--out`): its settings, and one method per stage. Each stage's
    result is a JSON file of its own (`run_stage`), so a re-run skips what is done."""

    def __init__(self, cfg: QualityConfig):
        self.s = s = cfg.settings()
        self.prepare_workers = cfg.prepare_workers
        self.out = out = cfg.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        settings_file = out / "settings.json"
        if settings_file.is_file():
            old = json.loads(settings_file.read_text())
            changed = sorted(k for k in set(old) | set(s) if old.get(k) != s.get(k))
            if changed:
                raise UserError(f"{out} holds a run with other settings ({', '.join(changed)} "
                                f"differ); use a new --out, or delete it to start over")
        else:
            write_json_atomic(settings_file, s)
        self.threads = s["threads"]
        self.shards = out / "shards"
        self.manifest = self.shards / "seq128" / "manifest.json"
        self.logs = out / "logs"
        self.cal: dict[str, Any] = {}

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return run_stage(self.out, name, fn)

    def overrides(self, run_overrides: list[str]) -> list[str]:
        # model.vocab_size set explicitly (the manifest's, which the trainer would take anyway
        # with fast.pad_vocab_multiple = 1): then --print-config shows the model that trains.
        s = self.s
        vocab_size = json.loads(self.manifest.read_text())["vocab_size"]
        sets = [f"data.manifest={self.manifest}", f"eval.samples={s['eval_samples']}",
                f"model.vocab_size={vocab_size}", *s["overrides"], *run_overrides]
        return [a for o in sets for a in ("--set", o)]

    def resolve(self) -> dict[str, Any]:
        """The recipe and DeepSpeed JSON exactly as `bertscale pretrain` resolves them; the
        transformers side takes everything from here except train.steps and eval.every, which it
        is given directly (its calibrated count)."""
        p = subprocess.run(bertscale_command() + ["pretrain", self.s["recipe"],
                                                  *self.overrides([]), "--print-config"],
                           env=child_env(self.threads), capture_output=True, text=True,
                           check=False)
        if p.returncode:
            raise UserError(f"`bertscale pretrain --print-config` failed: {p.stderr.strip()[-800:]}")
        return json.loads(p.stdout)

    # 1. prepare
    def prepare(self) -> dict[str, Any]:
        s = self.s
        vocab = ["--vocab", s["vocab"]] if s["vocab"] else ["--train-vocab", str(s["train_vocab"])]
        run_command(["prepare", *s["data"], "--out", str(self.shards), *vocab,
                     "--objective", "mlm", "--seq-len", "128", "--workers",
                     str(self.prepare_workers), "--progress", "log"], self.threads,
                    self.logs / "prepare.log")
        m = json.loads(self.manifest.read_text())
        return dict(manifest=str(self.manifest), stats=m["stats"], objective=m["pair_objective"])

    # 2. calibrate: each side's median step time -> its step count within the budget
    def calibrate(self) -> dict[str, Any]:
        s, n = self.s, self.s["calibrate_steps"]
        run_dir = self.out / "calibrate" / "bertscale"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_command(["pretrain", s["recipe"], *self.overrides(
            [f"train.steps={n}", "eval.every=0", "eval.at_start=false", "checkpoint.every=0",
             "checkpoint.at_end=false", "logging.every=1"]), "--run-dir", str(run_dir),
            "--resume", "never", "--no-wandb"], self.threads, self.logs / "calibrate_bertscale.log")
        times_a = [r["step_time_s"] for r in read_metrics(run_dir) if r["kind"] == "train"]
        resolved = self.resolve()
        side = TransformersSide(resolved, self.threads)
        _, stats_c = side.train(n, eval_every=n, eval_samples=1, evaluate=False)
        times_c = stats_c["step_time_s"]
        budget_s = 60 * s["budget_min"]
        # The first steps pay for allocation and warm-up, in both: the median of the rest.
        t_a, t_c = statistics.median(times_a[1:]), statistics.median(times_c[1:])
        return dict(resolved=resolved, step_s={"bertscale": t_a, "transformers": t_c},
                    budget_s=budget_s,
                    steps={"bertscale": max(1, int(budget_s / t_a)),
                           "transformers": max(1, int(budget_s / t_c))},
                    times_s={"bertscale": times_a, "transformers": times_c})

    def run_overrides(self, side: str) -> list[str]:
        steps = self.cal["steps"][side]
        return [f"train.steps={steps}", f"eval.every={max(1, steps // self.s['evals'])}",
                "eval.at_start=true", "logging.every=1"]

    # 3. pretrain (a): bertscale, resumable through its own checkpoints
    def pretrain_bertscale(self) -> dict[str, Any]:
        run_dir = self.out / "pretrain" / "bertscale"
        run_command(["pretrain", self.s["recipe"], *self.overrides(self.run_overrides("bertscale")),
                     "--run-dir", str(run_dir), "--no-wandb"], self.threads,
                    self.logs / "pretrain_bertscale.log")
        return dict(run_dir=str(run_dir), **bertscale_curve(run_dir))

    # 4. pretrain (c): transformers on the same batches
    def pretrain_transformers(self) -> dict[str, Any]:
        import transformers
        side = TransformersSide(self.cal["resolved"], self.threads)
        steps = self.cal["steps"]["transformers"]
        model, stats = side.train(steps, eval_every=max(1, steps // self.s["evals"]),
                                  eval_samples=self.s["eval_samples"])
        folder = self.out / "models" / "transformers"
        save_hf_folder(model, Path(side.manifest.vocab_file), side.manifest.lowercase, folder)
        return dict(model_dir=str(folder), transformers=transformers.__version__, **stats)

    # 5. the three Hugging Face folders
    def export(self) -> dict[str, Any]:
        folder = self.out / "models" / "bertscale"
        run_command(["export", "--from", str(self.out / "pretrain" / "bertscale"), "--to",
                     str(folder), "--overwrite"], self.threads, self.logs / "export.log")
        return dict(model_dir=str(folder))

    def random_init(self) -> dict[str, Any]:
        from bertscale.config import ModelConfig, from_dict
        from bertscale.data.shards import read_manifest
        from bertscale.hf import export_hf
        from bertscale.model import BertForPreTraining
        from bertscale.seeding import seed_all

        r = self.cal["resolved"]["recipe"]
        cfg = from_dict(ModelConfig, r["model"], "model")
        seed_all(r["train"]["seed"])
        m = read_manifest(self.manifest)
        folder = self.out / "models" / "random_init"
        export_hf(BertForPreTraining(cfg).state_dict(), cfg, m.vocab_file, m.lowercase, folder,
                  overwrite=True, source="random initialisation")
        return dict(model_dir=str(folder))

    # 6. fine-tune all three alike
    def finetune(self, model: str) -> dict[str, Any]:
        s, ft_out = self.s, self.out / "finetune" / model
        cmd = ["finetune", "glue", "--checkpoint", str(self.out / "models" / model),
               "--output-dir", str(ft_out), "--task", ",".join(s["tasks"]),
               "--data-dir", s["glue"], "--seeds", ",".join(map(str, s["seeds"])),
               "--lr", s["lr"], "--epochs", str(s["epochs"]), "--batch-size",
               str(s["batch_size"]), "--no-test", "--progress", "plain", "--no-wandb"]
        if s["max_train_samples"]:
            cmd += ["--max-train-samples", str(s["max_train_samples"])]
        if s["max_eval_samples"]:
            cmd += ["--max-eval-samples", str(s["max_eval_samples"])]
        run_command(cmd, self.threads, self.logs / f"finetune_{model}.log")
        return {t: json.loads((ft_out / t / "results.json").read_text()) for t in s["tasks"]}

    # 7. report (always rewritten: it only reads the stages)
    def report(self, prepared: dict[str, Any], pre: dict[str, dict[str, Any]],
               glue_raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
        import torch
        s, out = self.s, self.out
        glue = {t: {m: main_metric(glue_raw[m][t]) for m in MODELS} for t in s["tasks"]}
        pre_c = pre["transformers"]
        results = dict(
            argv=sys.argv,
            settings=s, tasks=s["tasks"],
            hardware=dict(date=time.strftime("%Y-%m-%d"), cpu=f"{platform.machine()} "
                          f"{platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
                          threads=self.threads, torch=torch.__version__,
                          transformers=pre_c["transformers"], python=platform.python_version()),
            data=prepared, calibration={k: self.cal[k] for k in ("step_s", "steps", "budget_s")},
            pretraining={m: {k: v for k, v in p.items() if k not in ("step_time_s",)}
                         for m, p in pre.items()},
            glue=glue, targets=targets(pre, glue, s["tasks"]),
            glue_full={m: glue_raw[m] for m in MODELS})
        curves = out / "pretraining_curves.png"
        results["plot"] = "pretraining_curves.png" if plot(results, curves) else None
        write_json_atomic(out / "results.json", results)
        table = markdown(results)
        write_text_atomic(out / "results.md", table)
        print(table)
        log(f"results in {out / 'results.json'}, {out / 'results.md'}")
        return results
