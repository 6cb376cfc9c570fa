"""`bertscale bench quality`: the paper's claim at small scale, end to end, in one resumable command.

    bertscale bench quality --data WIKI --glue GLUE --vocab VOCAB --out OUT
                            [--budget-min 30] [--seeds 1,2,3] [--tasks CoLA,MRPC,RTE,STS-B]

Stages, each skipped on a re-run once its result file OUT/stages/<stage>.json is written
(atomically, bertscale.files.write_json_atomic):

1. prepare: `bertscale prepare --objective mlm` of the raw text into OUT/shards (MLM-only: the
   comparison class, `transformers`' BertForMaskedLM as `run_mlm` trains it, has no NSP).
2. calibrate: a few steps of each side, timed; each side's step count is budget / its median
   step time, so each runs its whole warmup + decay schedule within the same wall-clock budget.
3. pretrain_bertscale: `bertscale pretrain` of the recipe (default quality_mini, BERT-Mini) with
   the calibrated train.steps; held-out MLM loss and accuracy from its metrics.jsonl.
4. pretrain_transformers: `transformers`' BertForMaskedLM (SDPA attention, its dense MLM loss)
   trained in this process on the SAME batches: bertscale's loader over the same shards with the
   same seed and masking (identical samples, masks and order), the same global and micro batch,
   the same AdamW / schedule (bertscale.optim built from the recipe `bertscale pretrain
   --print-config` resolves), the same gradient clipping (the DeepSpeed JSON's), the same torch
   threads, evaluated on the same first eval.samples held-out samples with the same masks.
5. export: `bertscale export` of (a) to OUT/models/bertscale; (c) is saved as a Hugging Face folder
   by `transformers` itself (in stage 4); (b) random_init: the same shape, bertscale's
   initialisation with the recipe's seed, written by bertscale.hf.export_hf (`bertscale finetune
   glue` has no random-init switch; a folder of untrained weights is the same path for all three).
6. finetune_<model>: `bertscale finetune glue` of each folder on --tasks, --seeds, one fine-tuning
   recipe for all three (itself resumable: finished runs are skipped).
7. report: OUT/results.json, OUT/results.md (mean ± std per task and model, the targets) and
   OUT/pretraining_curves.png (skipped, with one line saying so, without matplotlib).

Limits, stated honestly:
- The wall-clock axis is training time: the sum of the steps' own times (data fetch, forward,
  backward, optimizer step), the same measure on both sides; held-out evaluations, checkpoint
  saves and start-up are excluded (and reported separately as each stage's seconds).
- The budget is met through the step count calibrated from a short timing, not a clock that
  stops the run: a machine whose load changes between calibration and the run ends early or late
  (the actual training seconds are in the results).
- The transformers side runs in this process without DeepSpeed (plain torch, as a `run_mlm` user
  would), on the GPU when there is one; both are fp32 on one process (one device). Its stage restarts from scratch if interrupted (bertscale's
  resumes from its checkpoint).
- Initialisations differ: each side uses its own (both normal(0, 0.02)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import write_atomic, write_dir_atomic, write_json_atomic, write_text_atomic

GLUE_TASKS = ("CoLA", "MRPC", "RTE", "STS-B")
MODELS = ("bertscale", "transformers", "random_init")
MODEL_LABELS = {"bertscale": "(a) bertscale pretrained", "transformers": "(c) transformers pretrained",
                "random_init": "(b) random init"}
DEFAULT_RECIPE = "quality_mini"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="raw text: the Wikipedia extracts folder (WikiExtractor .gz files) or files")
    p.add_argument("--glue", type=Path, required=True, help="the GLUE folder (<Task>/train.tsv ...)")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", type=Path, help="WordPiece vocab.txt (e.g. Google's BERT uncased)")
    vocab.add_argument("--train-vocab", type=int, metavar="SIZE",
                       help="train a WordPiece vocabulary of SIZE tokens from --data instead "
                            "(`bertscale prepare --train-vocab`; small toy runs)")
    p.add_argument("--out", type=Path, required=True, help="work and result folder (resumable)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"pretraining recipe, name or TOML (default {DEFAULT_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="recipe override for both sides, e.g. model.preset=small (repeatable)")
    p.add_argument("--budget-min", type=float, default=30.0,
                   help="pretraining wall-clock budget per side, minutes of training (default 30)")
    p.add_argument("--calibrate-steps", type=int, default=20,
                   help="steps each side is timed for to size its run (default 20)")
    p.add_argument("--evals", type=int, default=10,
                   help="held-out evaluations per pretraining run, besides the one at step 0")
    p.add_argument("--eval-samples", type=int, default=1024,
                   help="held-out samples per evaluation, the same on both sides (default 1024)")
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--tasks", default=",".join(GLUE_TASKS), help="comma list of GLUE tasks")
    p.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds (default 1,2,3)")
    p.add_argument("--lr", default="1e-4", help="fine-tuning learning rate(s), comma list "
                   "(default 1e-4, Turc et al.'s rate for small BERTs)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    p.add_argument("--max-train-samples", type=int, default=2000,
                   help="fine-tuning examples per task (default 2000; 0: all)")
    p.add_argument("--max-eval-samples", type=int, default=0, help="dev examples (0: all)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every stage (default: the machine's cores)")


# ------------------------------------------------------------------------------ helpers


def log(msg: str) -> None:
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


# ------------------------------------------------------------------- the transformers side


class TransformersSide:
    """`transformers`' BertForMaskedLM trained on bertscale's batches with bertscale's optimizer
    and schedule, from the recipe as `bertscale pretrain --print-config` resolved it."""

    def __init__(self, resolved: dict[str, Any], threads: int):
        import torch

        from bertscale.config import ModelConfig, OptimizerConfig, ScheduleConfig, from_dict
        from bertscale.data.loader import MaskingConfig
        from bertscale.data.shards import read_manifest

        torch.set_num_threads(threads)
        # The GPU when there is one, as `bertscale pretrain` uses it (benchmarks/gpu_quality.sh).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        r = resolved["recipe"]
        self.model_config = from_dict(ModelConfig, r["model"], "model")
        self.optimizer = from_dict(OptimizerConfig, r["optimizer"], "optimizer")
        self.schedule = from_dict(ScheduleConfig, r["schedule"], "schedule")
        self.manifest = read_manifest(r["data"]["manifest"])
        self.masking = MaskingConfig(mask_prob=r["data"]["mask_prob"],
                                     max_predictions_per_seq=r["data"]["max_predictions_per_seq"],
                                     whole_word=r["data"]["whole_word_masking"])
        t = r["train"]
        self.seed, self.G, self.micro = t["seed"], t["global_batch_size"], t["micro_batch_size"]
        self.accum = self.G // self.micro
        self.clip = float(resolved["deepspeed"].get("gradient_clipping", 0.0))
        self.eval_micro = r["eval"]["micro_batch_size"] or self.micro

    def build_model(self) -> Any:
        import transformers

        from bertscale.hf import config_to_hf
        from bertscale.seeding import seed_all

        seed_all(self.seed)
        hf_cfg = transformers.BertConfig(**config_to_hf(self.model_config))
        hf_cfg._attn_implementation = "sdpa"  # PyTorch's fused attention, as bertscale's
        return transformers.BertForMaskedLM(hf_cfg).to(self.device).train()

    def loader(self, split: str, max_samples: int = 0) -> Any:
        from bertscale.data.loader import PretrainLoader

        micro = self.micro if split == "train" else self.eval_micro
        return PretrainLoader(self.manifest, split=split,
                              global_batch_size=self.G if split == "train" else micro,
                              micro_batch_size=micro, rank=0, world_size=1, seed=self.seed,
                              masking=self.masking, verify_sha256=False, max_samples=max_samples)

    @staticmethod
    def dense_labels(batch: dict[str, Any]) -> Any:
        """(B, T) labels for transformers' dense MLM loss from the loader's (positions, labels)."""
        from bertscale.bench.model import Batch

        return Batch(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                     batch["masked_positions"], batch["masked_labels"],
                     batch["next_sentence_label"]).dense_labels()

    def train(self, steps: int, eval_every: int, eval_samples: int,
              evaluate: bool = True) -> tuple[Any, dict[str, Any]]:
        """Train `steps` steps; returns the model and the same statistics bertscale_curve gives."""
        import torch

        from bertscale.optim import build_optimizer, build_scheduler

        model = self.build_model()
        opt = build_optimizer(self.optimizer, model)
        sched = build_scheduler(opt, self.schedule, steps)
        loader = self.loader("train")
        batches = iter(loader)
        curve: list[dict[str, Any]] = []
        tokens_per_step: list[int] = []
        times: list[float] = []

        def point(step: int) -> None:
            curve.append(dict(step=step, train_s=sum(times), tokens=sum(tokens_per_step),
                              **self.evaluate(model, eval_samples)))
            log(f"transformers step {step}: held-out mlm_loss {curve[-1]['mlm_loss']:.4f} "
                f"mlm_acc {curve[-1]['mlm_acc']:.3f}")

        try:
            if evaluate:
                point(0)
            for step in range(1, steps + 1):
                t0 = time.perf_counter()
                tokens = 0
                for _ in range(self.accum):
                    cpu = next(batches)  # labels and token counts made on the host: no sync
                    labels = self.dense_labels(cpu).to(self.device)
                    b = {k: v.to(self.device) for k, v in cpu.items()}
                    loss = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                 attention_mask=b["attention_mask"], labels=labels).loss
                    (loss / self.accum).backward()  # DeepSpeed divides by the accumulation too
                    tokens += int(cpu["attention_mask"].sum())
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the step's time is the device's
                times.append(time.perf_counter() - t0)
                tokens_per_step.append(tokens)
                if evaluate and (step % eval_every == 0 or step == steps):
                    point(step)
        finally:
            loader.close()
        return model, dict(curve=curve, steps=steps, train_s=sum(times),
                           tokens=sum(tokens_per_step), tokens_per_step=tokens_per_step,
                           step_time_s=times, torch_threads=torch.get_num_threads())

    def evaluate(self, model: Any, samples: int) -> dict[str, Any]:
        """Token-weighted MLM loss and accuracy over the first `samples` held-out samples, the
        masked positions only (bertscale's own eval does the same sums)."""
        import torch
        import torch.nn.functional as F

        loader = self.loader("eval", max_samples=samples)
        loss_sum, correct, count, n = 0.0, 0, 0, 0
        V = self.manifest.vocab_size
        model.eval()
        try:
            it = iter(loader)
            with torch.no_grad():
                for _ in range(len(loader)):
                    b = {k: v.to(self.device) for k, v in next(it).items()}
                    logits = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                                   attention_mask=b["attention_mask"]).logits    # (B, T, V)
                    valid = b["masked_labels"] != -100                          # (B, P)
                    rows = torch.arange(logits.shape[0], device=self.device)[:, None].expand_as(valid)
                    picked = logits[rows[valid], b["masked_positions"][valid]][:, :V].float()
                    labels = b["masked_labels"][valid]
                    loss_sum += float(F.cross_entropy(picked, labels, reduction="sum"))
                    correct += int((picked.argmax(-1) == labels).sum())
                    count += int(valid.sum())
                    n += int((b["sample_ids"] >= 0).sum())
        finally:
            model.train()
            loader.close()
        return dict(mlm_loss=loss_sum / max(count, 1), mlm_acc=correct / max(count, 1),
                    eval_samples=n)


def save_hf_folder(model: Any, vocab: Path, lowercase: bool, out: Path) -> None:
    """transformers' own save_pretrained plus the tokenizer files, put in place whole."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        shutil.copyfile(vocab, tmp / "vocab.txt")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}) + "\n")
    write_dir_atomic(out, fill, replace=True)


# ---------------------------------------------------------------------------- the report


def main_metric(summary: dict[str, Any]) -> dict[str, Any]:
    m = summary["metrics"][summary["main_metric"]]
    return dict(metric=summary["main_metric"], mean=m["mean"], std=m["std"],
                n=sum(1 for r in summary["runs"] if r["lr"] == summary["best_lr"]),
                best_lr=summary["best_lr"])


def time_to_reach(curve: list[dict[str, Any]], loss: float) -> float | None:
    """Training seconds of the first held-out point at or below `loss` (None: never)."""
    return next((p["train_s"] for p in curve if p["mlm_loss"] <= loss), None)


def targets(pre: dict[str, dict[str, Any]], glue: dict[str, dict[str, Any]],
            tasks: list[str]) -> dict[str, Any]:
    a, c = pre["bertscale"], pre["transformers"]
    c_final = c["curve"][-1]["mlm_loss"]
    reach = time_to_reach(a["curve"], c_final)
    ratio = reach / c["train_s"] if reach is not None and c["train_s"] else None

    def spread(m: dict[str, Any]) -> float:
        return m["std"] or 0.0

    beats = {}
    for t in tasks:
        ma, mb = glue[t]["bertscale"], glue[t]["random_init"]
        beats[t] = ma["mean"] - mb["mean"] > max(spread(ma), spread(mb))
    avg = {m: statistics.fmean(glue[t][m]["mean"] for t in tasks) for m in MODELS}
    return {
        "a_beats_b_every_task_by_more_than_seed_spread": all(beats.values()),
        "a_beats_b_by_task": beats,
        "transformers_final_mlm_loss": c_final,
        "bertscale_final_mlm_loss": a["curve"][-1]["mlm_loss"],
        "bertscale_seconds_to_transformers_final_loss": reach,
        "time_ratio": ratio,
        "time_ratio_at_most_0.7": ratio is not None and ratio <= 0.7,
        "glue_average": avg,
        "a_better_glue_average_than_c": avg["bertscale"] > avg["transformers"],
    }


def _cell(m: dict[str, Any]) -> str:
    return (f"{100 * m['mean']:.1f}" if m["std"] is None
            else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}")


def markdown(results: dict[str, Any]) -> str:
    tasks, glue, pre, tg = results["tasks"], results["glue"], results["pretraining"], results["targets"]
    lines = [f"Quality at small scale: {results['hardware']['date']}, {results['hardware']['cpu']}, "
             f"{results['hardware']['threads']} threads, torch {results['hardware']['torch']}, "
             f"transformers {results['hardware']['transformers']}.", "",
             "| model | " + " | ".join(f"{t} ({glue[t]['bertscale']['metric']})" for t in tasks)
             + " | average |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for m in MODELS:
        lines.append(f"| {MODEL_LABELS[m]} | " + " | ".join(_cell(glue[t][m]) for t in tasks)
                     + f" | {100 * tg['glue_average'][m]:.1f} |")
    seeds = glue[tasks[0]]["bertscale"]["n"]
    lines += ["", f"Dev metrics x100, mean ± std over {seeds} seed(s).", "",
              "| pretraining | steps | training s | tokens | final held-out MLM loss | MLM acc |",
              "|---|---|---|---|---|---|"]
    for m in ("bertscale", "transformers"):
        p = pre[m]
        lines.append(f"| {m} | {p['steps']} | {p['train_s']:.0f} | {p['tokens']:,} | "
                     f"{p['curve'][-1]['mlm_loss']:.3f} | {p['curve'][-1]['mlm_acc']:.3f} |")
    reach = tg["bertscale_seconds_to_transformers_final_loss"]
    lines += ["", "Targets:",
              f"- (a) beats (b) on every task by more than the seed spread: "
              f"{'met' if tg['a_beats_b_every_task_by_more_than_seed_spread'] else 'MISSED'} "
              f"({', '.join(f'{t}: {v}' for t, v in tg['a_beats_b_by_task'].items())})",
              f"- bertscale reaches transformers' final held-out MLM loss "
              f"({tg['transformers_final_mlm_loss']:.3f}) in <= 0.7x its time: "
              + (f"{'met' if tg['time_ratio_at_most_0.7'] else 'MISSED'} ({reach:.0f} s, "
                 f"{tg['time_ratio']:.2f}x)" if reach is not None else "MISSED (never reached)"),
              f"- better GLUE average than transformers at equal wall-clock: "
              f"{'met' if tg['a_better_glue_average_than_c'] else 'MISSED'}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'bertscale[bench]'): plot skipped")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in ("bertscale", "transformers"):
        c = results["pretraining"][m]["curve"]
        axes[0].plot([p["train_s"] / 60 for p in c], [p["mlm_loss"] for p in c], "o-",
                     label=MODEL_LABELS[m])
        axes[1].plot([p["tokens"] / 1e6 for p in c], [p["mlm_loss"] for p in c], "o-",
                     label=MODEL_LABELS[m])
    axes[0].set_xlabel("training wall-clock (min)")
    axes[1].set_xlabel("tokens seen (M)")
    for ax in axes:
        ax.set_ylabel("held-out MLM loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ the bench


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that decide the results; a re-run into the same --out must give the same."""
    if args.budget_min <= 0 or args.calibrate_steps < 2 or args.evals < 1 or args.eval_samples < 1:
        raise UserError("--budget-min must be > 0, --calibrate-steps >= 2, --evals and "
                        "--eval-samples >= 1")
    from bertscale.commands import parse_list

    tasks = parse_list(args.tasks, str, "--tasks")
    for t in tasks:
        if not (args.glue / t / "train.tsv").is_file():
            raise UserError(f"--tasks {t}: {args.glue / t / 'train.tsv'} not found")
    for f in args.data:
        if not f.exists():
            raise UserError(f"--data {f}: no such file or folder")
    if args.vocab is not None and not args.vocab.is_file():
        raise UserError(f"--vocab {args.vocab}: no such file")
    return dict(data=[str(p.resolve()) for p in args.data], glue=str(args.glue.resolve()),
                vocab=str(args.vocab.resolve()) if args.vocab else None,
                train_vocab=args.train_vocab, recipe=args.recipe, overrides=list(args.overrides),
                budget_min=args.budget_min, calibrate_steps=args.calibrate_steps, evals=args.evals,
                eval_samples=args.eval_samples, tasks=tasks,
                seeds=parse_list(args.seeds, int, "--seeds"), lr=args.lr, epochs=args.epochs,
                batch_size=args.batch_size, max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples,
                threads=args.threads or os.cpu_count() or 1)


class QualityRun:
    """One benchmark folder (`--out`): its settings, and one method per stage. Each stage's
    result is a JSON file of its own (`run_stage`), so a re-run skips what is done."""

    def __init__(self, args: argparse.Namespace):
        self.s = s = settings_of(args)
        self.prepare_workers = args.prepare_workers
        self.out = out = args.out.resolve()
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
               glue_raw: dict[str, dict[str, Any]]) -> None:
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


def handle(args: argparse.Namespace) -> int:
    """The stages in order, each skipped when its result is on disk."""
    run = QualityRun(args)
    prepared = run.stage("prepare", run.prepare)
    run.cal = cal = run.stage("calibrate", run.calibrate)
    log(f"calibrated: bertscale {cal['step_s']['bertscale']:.3f} s/step -> "
        f"{cal['steps']['bertscale']} steps; transformers {cal['step_s']['transformers']:.3f} "
        f"s/step -> {cal['steps']['transformers']} steps")
    pre = {"bertscale": run.stage("pretrain_bertscale", run.pretrain_bertscale),
           "transformers": run.stage("pretrain_transformers", run.pretrain_transformers)}
    run.stage("export", run.export)
    run.stage("random_init", run.random_init)
    glue_raw = {m: run.stage(f"finetune_{m}", lambda m=m: run.finetune(m)) for m in MODELS}
    run.report(prepared, pre, glue_raw)
    return 0
