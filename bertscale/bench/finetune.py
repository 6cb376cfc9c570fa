"""`bertscale bench finetune`: how fast a GLUE fine-tuning step and a dev-set prediction pass
run on the task's real text, for each way of shaping the batches.

    bertscale bench finetune --task MRPC --data-dir GLUE --preset base --vocab vocab.txt
    bertscale bench finetune --task RTE --data-dir GLUE --checkpoint HF_OR_BERTSCALE_DIR

Training step (forward, loss, backward, AdamW step; the same randomly drawn batches of real
training examples for every variant):
  max_length    every batch padded to --max-seq-length: Google's run_classifier and the
                `transformers` run_glue example's default (pad_to_max_length)
  dynamic       padded to the batch's longest member: bertscale's default
  unpad         dynamic + the encoder on the real tokens only (`--unpad`)
  transformers  `transformers`' BertForSequenceClassification (SDPA), dynamic padding, the same
                weights (when transformers is installed)
Prediction over the dev set (--max-eval-samples examples, --eval-batch-size):
  input_order   batches in file order, dynamic padding (a Trainer with a padding collator)
  sorted        batches of length-sorted examples: what `bertscale finetune` does
  sorted_unpad  sorted + `--unpad`

The variants alternate repeat by repeat (so drifting machine load hits all alike) after a
warm-up; each reports the median time, and speed-ups are the median of the per-repeat ratios
(pairs timed back to back). Weights are random for --preset (speed depends on the shape,
not the values) or a checkpoint's. Every variant's loss on the first batch, in eval mode, is
recorded in the JSON: they agree, which shows the variants compute the same model.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bertscale.config import ModelConfig, preset
from bertscale.devices import resolve_device
from bertscale.distributed import discover
from bertscale.errors import UserError
from bertscale.devices import to_device
from bertscale.finetune import glue
from bertscale.finetune.data import Batch, collate, model_inputs
from bertscale.finetune.models import load_checkpoint, load_task_tokenizer
from bertscale.finetune.predict import predict
from bertscale.finetune.runtime import Runtime
from bertscale.training.torch_engine import adamw
from bertscale.model import BertForSequenceClassification
from bertscale.parallelize import FastPaths, apply_fast_paths
from bertscale.seeding import seed_all

TRAIN_VARIANTS = ("max_length", "dynamic", "unpad", "transformers")
PREDICT_VARIANTS = ("input_order", "sorted", "sorted_unpad")


@dataclass
class FinetuneBenchConfig:
    """One `bertscale bench finetune` run."""

    data_dir: Path
    """The GLUE folder."""
    task: str = "MRPC"
    checkpoint: Path | None = None
    """A Hugging Face or bertscale checkpoint; None: `preset` with random weights."""
    preset: str = "base"
    vocab: str | None = None
    """vocab.txt for `preset` (casing guessed from it)."""
    max_seq_length: int = 128
    batch: int = 32
    """Training examples per step."""
    eval_batch_size: int = 64
    max_eval_samples: int = 256
    """Dev examples per prediction pass."""
    num_batches: int = 4
    """Distinct training batches."""
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    no_transformers: bool = False
    no_predict: bool = False
    """Time the training step only."""

    def validate(self) -> None:
        for flag in ("batch", "eval_batch_size", "repeats", "num_batches", "max_seq_length"):
            if getattr(self, flag) <= 0:
                raise UserError(f"--{flag.replace('_', '-')} must be positive")


def _pad_to(batch: Batch, length: int, pad_id: int) -> Batch:
    """Pad a dynamically padded batch on to `length` positions."""
    extra = length - batch["input_ids"].shape[-1]
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["token_type_ids"] = F.pad(batch["token_type_ids"], (0, extra))
    out["attention_mask"] = F.pad(batch["attention_mask"], (0, extra))
    return out


def _load(args: FinetuneBenchConfig) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, Any, str]:
    """(config, weights or None for random, tokenizer, description of the model)."""
    from bertscale.tokenizer import guess_lowercase, load_tokenizer
    if args.checkpoint:
        pre = load_checkpoint(args.checkpoint)
        tok = load_task_tokenizer(pre, args.max_seq_length)
        return pre.config, pre.state_dict, tok, str(args.checkpoint)
    if not args.vocab:
        raise UserError("give --checkpoint, or --preset with --vocab (the vocabulary that "
                        "tokenizes the task's text)")
    if not Path(args.vocab).is_file():
        raise UserError(f"--vocab {args.vocab}: no such file")
    tok = load_tokenizer(args.vocab, guess_lowercase(args.vocab))
    tok.enable_truncation(max_length=args.max_seq_length, strategy="longest_first")
    cfg = preset(args.preset, vocab_size=tok.get_vocab_size())
    if args.max_seq_length > cfg.max_position_embeddings:
        raise UserError(f"--max-seq-length {args.max_seq_length} exceeds the "
                        f"{cfg.max_position_embeddings} positions of the {args.preset} preset")
    return cfg, None, tok, f"{args.preset} preset, random weights"


def _transformers_copy(model: torch.nn.Module, cfg: ModelConfig, num_labels: int) -> Any:
    from bertscale.bench.model import import_transformers
    from bertscale.hf import config_to_hf, to_hf_keys
    transformers = import_transformers()
    if transformers is None:
        return None
    hf_cfg = transformers.BertConfig(**config_to_hf(cfg), num_labels=num_labels)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.BertForSequenceClassification(hf_cfg)
    sd = to_hf_keys(model.state_dict(), cfg, "BertForSequenceClassification", "bench")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return hf


class _Bench:
    """The two models (ours and, unless --no-transformers, transformers' copy of the same
    weights), their optimizers, and the batches of every variant, built once; one method per
    thing that is timed."""

    def __init__(self, args: FinetuneBenchConfig):
        self.args = args
        self.device = device = resolve_device(args.device)
        self.task = task = glue.task_by_name(args.task)
        folder = glue.find_task_dir(args.data_dir, task)
        self.cfg, weights, tok, self.what = _load(args)
        self.regression = regression = task.labels is None
        num_labels = 1 if regression else len(task.labels or ())
        train = glue.featurize(tok, glue.read_tsv(folder / "train.tsv", task, task.train,
                                                  labelled=True), regression)
        dev_file = folder / task.dev_files[0][0]
        self.dev = glue.featurize(tok, glue.read_tsv(dev_file, task, task.train, labelled=True),
                                  regression)[:args.max_eval_samples]
        self.pad_id = pad_id = tok.token_to_id("[PAD]")

        seed_all(args.seed)
        self.ours = BertForSequenceClassification(self.cfg, num_labels)
        if weights is not None:
            from bertscale.model import load_pretrained
            load_pretrained(self.ours, weights, self.what)
        self.hf = None if args.no_transformers else _transformers_copy(self.ours, self.cfg,
                                                                       num_labels)
        self.ours.to(device).train()
        self.opt_ours, _ = adamw(self.ours, lr=1e-5, weight_decay=0.01, warmup=0.1,
                                 total_steps=1000, device=device)
        if self.hf is not None:
            self.hf.to(device).train()
            self.opt_hf, _ = adamw(self.hf, lr=1e-5, weight_decay=0.01, warmup=0.1,
                                   total_steps=1000, device=device)
        self.loss = glue.loss_fn(regression)

        rng = np.random.default_rng(args.seed)
        draws = [rng.choice(len(train), size=min(args.batch, len(train)), replace=False)
                 for _ in range(args.num_batches)]
        self.dynamic = dynamic = [to_device(collate([train[i] for i in d], pad_id),
                                                   device) for d in draws]
        self.shaped = {"max_length": [_pad_to(b, args.max_seq_length, pad_id) for b in dynamic],
                       "dynamic": dynamic, "unpad": dynamic, "transformers": dynamic}
        self.fast_of = {"max_length": FastPaths(), "dynamic": FastPaths(),
                        "unpad": FastPaths(unpad=True)}
        self.train_names = [n for n in TRAIN_VARIANTS if n != "transformers" or self.hf is not None]

    def hf_loss(self, model: Any, batch: Batch) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), batch["label"].float())
        return F.cross_entropy(logits.float(), batch["label"])

    def train_step(self, name: str, batch: Batch) -> None:
        if name == "transformers":
            self.hf_loss(self.hf, batch).backward()
            self.opt_hf.step()
            self.opt_hf.zero_grad(set_to_none=True)
            return
        apply_fast_paths(self.ours, self.fast_of[name])
        self.loss(self.ours, batch).backward()
        self.opt_ours.step()
        self.opt_ours.zero_grad(set_to_none=True)

    def predict_pass(self, name: str) -> None:
        args, ours, dev = self.args, self.ours, self.dev
        if name == "input_order":
            apply_fast_paths(ours, FastPaths())
            ours.eval()
            with torch.no_grad():
                for i in range(0, len(dev), args.eval_batch_size):
                    b = to_device(collate(dev[i:i + args.eval_batch_size],
                                                        self.pad_id), self.device)
                    glue.logits_of(ours, b).float().cpu()
            ours.train()
            return
        fast = FastPaths(unpad=name == "sorted_unpad")
        predict(ours, dev, glue.logits_of, Runtime(discover({}), self.device, None),
                batch_size=args.eval_batch_size, fast=fast, pad_id=self.pad_id)

    def first_losses(self) -> dict[str, float]:
        """Each training variant's loss on the same first batch, before any step: the variants
        compute the same function, so these agree (the check that the timings compare alike)."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for name in self.train_names:
                model = self.hf if name == "transformers" else self.ours
                assert model is not None  # "transformers" is a variant only with self.hf
                if model is self.ours:
                    apply_fast_paths(self.ours, self.fast_of[name])
                model.eval()
                b = self.shaped[name][0]
                out[name] = float((self.hf_loss if model is self.hf else self.loss)(model, b))
                model.train()
        return out

    def timed(self, fn: Callable[[], None]) -> float:
        def sync() -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def time_all(self) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Seconds per training step and per prediction pass of every variant, the variants
        interleaved within each repeat (in alternating order) so that load drifts alike."""
        args = self.args
        train_s: dict[str, list[float]] = {n: [] for n in self.train_names}
        predict_s: dict[str, list[float]] = {n: [] for n in PREDICT_VARIANTS}
        for r in range(args.warmup + args.repeats):
            order = self.train_names if r % 2 == 0 else self.train_names[::-1]
            for name in order:
                b = self.shaped[name][r % args.num_batches]
                t = self.timed(partial(self.train_step, name, b))
                if r >= args.warmup:
                    train_s[name].append(t)
            if not args.no_predict:
                for name in (PREDICT_VARIANTS if r % 2 == 0 else PREDICT_VARIANTS[::-1]):
                    t = self.timed(partial(self.predict_pass, name))
                    if r >= args.warmup:
                        predict_s[name].append(t)
        return train_s, predict_s


def _paired(times: dict[str, list[float]], base: str, name: str) -> float:
    """Median over repeats of base / name, each pair timed within the same repeat: less moved by
    load that drifts between repeats than a ratio of medians."""
    return statistics.median(b / t for b, t in zip(times[base], times[name]))


def bench_finetune(args: FinetuneBenchConfig) -> dict[str, Any]:
    """Time the training step and the dev prediction of every variant (module docstring); the
    results as a JSON-ready dict."""
    args.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = _Bench(args)
    first_loss = bench.first_losses()
    load_before = os.getloadavg()
    train_s, predict_s = bench.time_all()
    load_after = os.getloadavg()

    dynamic, dev, cfg = bench.dynamic, bench.dev, bench.cfg
    tokens = statistics.fmean(float(b["attention_mask"].sum()) for b in dynamic)
    train_results = {}
    for name in bench.train_names:
        t = statistics.median(train_s[name])
        train_results[name] = dict(step_s=t, times_s=train_s[name], tokens_per_s=tokens / t,
                                   speedup_vs_max_length=_paired(train_s, "max_length", name))
        if "transformers" in train_s:
            train_results[name]["speedup_vs_transformers"] = _paired(train_s, "transformers", name)
    predict_results = {}
    dev_tokens = sum(len(f["input_ids"]) for f in dev)
    for name in PREDICT_VARIANTS if not args.no_predict else ():
        t = statistics.median(predict_s[name])
        predict_results[name] = dict(pass_s=t, times_s=predict_s[name], examples_per_s=len(dev) / t,
                                     speedup_vs_input_order=_paired(predict_s, "input_order", name))
    from bertscale.bench.model import device_name, import_transformers
    transformers = import_transformers() if bench.hf is not None else None
    return dict(
        argv=sys.argv[1:], date=time.strftime("%Y-%m-%d"), device=device_name(bench.device),
        threads=torch.get_num_threads(), load_avg_before=load_before, load_avg_after=load_after,
        torch=torch.__version__, transformers=getattr(transformers, "__version__", None),
        task=bench.task.name, model=bench.what, hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers, batch=args.batch, max_seq_length=args.max_seq_length,
        precision="fp32", mean_real_tokens_per_batch=tokens,
        fill_of_max_length=tokens / (args.batch * args.max_seq_length),
        mean_padded_length_dynamic=statistics.fmean(b["input_ids"].shape[1] for b in dynamic),
        dev_examples=len(dev), dev_tokens=dev_tokens, warmup=args.warmup, repeats=args.repeats,
        first_batch_eval_loss=first_loss, train=train_results, predict=predict_results)


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['task']}: {r['model']} (hidden {r['hidden']}, {r['layers']} layers), "
             f"{r['device']}, {r['threads']} threads, {r['precision']}, torch {r['torch']}",
             f"training step, batch {r['batch']}, max_seq_length {r['max_seq_length']}: "
             f"{r['mean_real_tokens_per_batch']:.0f} real tokens per batch "
             f"({r['fill_of_max_length']:.0%} of max_length; dynamic pads to "
             f"{r['mean_padded_length_dynamic']:.0f} on average)",
             f"  {'variant':14}{'s/step':>9}{'tokens/s':>11}{'vs max_length':>15}"
             f"{'vs transformers':>17}"]
    for name, x in r["train"].items():
        vs_hf = x.get("speedup_vs_transformers")
        lines.append(f"  {name:14}{x['step_s']:>9.3f}{x['tokens_per_s']:>11.0f}"
                     f"{x['speedup_vs_max_length']:>14.2f}x"
                     + (f"{vs_hf:>16.2f}x" if vs_hf is not None else ""))
    if r["predict"]:
        lines.append(f"dev prediction, {r['dev_examples']} examples:")
        lines.append(f"  {'variant':14}{'s/pass':>9}{'examples/s':>11}{'vs input_order':>15}")
        for name, x in r["predict"].items():
            lines.append(f"  {name:14}{x['pass_s']:>9.3f}{x['examples_per_s']:>11.0f}"
                         f"{x['speedup_vs_input_order']:>14.2f}x")
    lines.append("first-batch eval loss: " + ", ".join(
        f"{k} {v:.6f}" for k, v in r["first_batch_eval_loss"].items()))
    lines.append(f"load average {r['load_avg_before'][0]:.1f} -> {r['load_avg_after'][0]:.1f}")
    return "\n".join(lines)
