"""What every fine-tuning task shares: the checkpoint loader, the training loop, the seed /
learning-rate grid, and result files.

Checkpoints: a Hugging Face BERT folder (config.json + weights + vocab.txt) or a bertscale
pretraining run / checkpoint directory (any ZeRO stage, consolidated on load, no converter to
run by hand). The vocabulary and casing always come with the checkpoint.

Training is the paper's recipe with the pretraining code's optimizer and schedule
(bertscale.optim): AdamW with eps 1e-6 and weight decay 0.01 (none on biases and LayerNorm
weights; fused on a GPU), linear warmup over the first 10% of steps then linear decay to 0,
gradient clipping at 1.0, bf16 autocast on a GPU that has it (fp16 with loss scaling
otherwise), fp32 on the CPU. Results: mean and sample standard deviation over --seeds for each
learning rate, written to results.json beside the prediction files.

One process or several: started by torchrun, srun, mpirun or the deepspeed launcher (the
discovery of bertscale.distributed), the W processes train data-parallel (DistributedDataParallel;
NCCL on GPUs, gloo on the CPU), one device each. --batch-size stays the GLOBAL batch: every rank
draws the same shuffled order, takes its contiguous share of each global batch, and its loss is
weighted by its share, so the averaged gradient is the gradient of the global batch's mean loss
(uneven last batches included) and W ranks train the same model as one process does. Prediction
is shared out by batch and gathered; only rank 0 writes files and prints.

Limits, stated honestly:
- Data parallelism is plain replication (the whole model and AdamW state on every device):
  BERT-Large fine-tuning fits one GPU, so no ZeRO sharding is used here. The lr x seed grid runs
  its settings one after the other on all ranks; independent jobs (slurm/finetune.sbatch array
  tasks) are the other way to spread a grid.
- Batches are padded to their longest member (dynamic padding); predictions run over the
  examples sorted by length (less padding) and are returned in input order. Neither changes
  results. The model's fast paths (--unpad, --compile, --checkpoint-activations) are off by
  default; each has a parity test against the plain path.
- Fine-tuned weights are saved only with --save-model (a Hugging Face folder per run, head
  included), since a learning-rate x seed grid would otherwise write one model per run.
- The paper picks the best learning rate on the dev set; so do we, which means the dev score of
  the chosen setting is optimistic in the same way the paper's is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bertscale.config import ModelConfig
from bertscale.distributed import DistEnv
from bertscale.errors import UserError
from bertscale.model import FastPaths

# ------------------------------------------------------------------------ checkpoints


@dataclass
class Pretrained:
    """A pretrained encoder ready to put under a fine-tuning head."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    """BertForPreTraining keys (bert.*, cls.*); heads that are absent are fine."""
    vocab_path: Path
    lowercase: bool
    source: str
    """The path as the user gave it, for messages and the results file."""
    kind: str
    """"huggingface" or "bertscale"."""


def load_checkpoint(path: str | Path) -> Pretrained:
    """A Hugging Face folder (it has config.json) or a bertscale run / checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: checkpoint not found")
    if p.is_dir() and (p / "config.json").is_file():
        from bertscale.hf import load_hf_folder
        ck = load_hf_folder(p)
        kind = "huggingface"
    else:
        try:
            from bertscale.checkpoint import load_consolidated
        except ModuleNotFoundError as e:
            if e.name != "bertscale.checkpoint":
                raise
            raise UserError(f"{p}: no config.json, so not a Hugging Face folder, and this "
                            f"installation cannot read bertscale checkpoints") from None
        ck = load_consolidated(p)
        kind = "bertscale"
    return Pretrained(config=ck.config, state_dict=dict(ck.state_dict),
                      vocab_path=Path(ck.vocab_path), lowercase=bool(ck.lowercase),
                      source=str(p), kind=kind)


def build_model(head: Callable[..., nn.Module], pretrained: Pretrained, **kwargs: Any) -> nn.Module:
    """A fresh head on the pretrained encoder; the head's own weights start from init."""
    from bertscale.model import load_pretrained
    model = head(pretrained.config, **kwargs)
    with warnings.catch_warnings():
        # An encoder-only checkpoint has no pooler for the classification heads: that is said
        # once by check_pooler below, not as a library warning per run.
        warnings.simplefilter("ignore")
        fresh = load_pretrained(model, pretrained.state_dict, pretrained.source)
    missing_pooler = [k for k in fresh if ".pooler." in k]
    if missing_pooler:
        log(f"note: {pretrained.source} has no pooler weights; the [CLS] pooler starts from "
            f"a random initialisation and is trained with the head")
    return model


def save_model(model: nn.Module, pretrained: Pretrained, folder: Path, architecture: str) -> Path:
    """The fine-tuned model, head included, as a Hugging Face folder (`folder`/model), written
    by rank 0 (the replicas are identical)."""
    from bertscale.hf import export_hf
    if not ranks().is_main:
        return folder / "model"
    return export_hf(model.state_dict(), pretrained.config, pretrained.vocab_path,
                     pretrained.lowercase, folder / "model", architecture=architecture,
                     overwrite=True, source=f"fine-tuned from {pretrained.source}")


def load_task_tokenizer(pretrained: Pretrained, max_length: int | None = None):
    """The checkpoint's WordPiece tokenizer, with its own casing; optional truncation."""
    from bertscale.tokenizer import load_tokenizer
    check_length(pretrained, max_length)
    tok = load_tokenizer(pretrained.vocab_path, pretrained.lowercase)
    if max_length is not None:
        tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


def check_length(pretrained: Pretrained, max_seq_length: int | None) -> None:
    if max_seq_length is not None and max_seq_length > pretrained.config.max_position_embeddings:
        raise UserError(f"--max-seq-length {max_seq_length} exceeds the "
                        f"{pretrained.config.max_position_embeddings} positions of "
                        f"{pretrained.source}")


def check_casing(pretrained: Pretrained, unk_rate: float, what: str) -> None:
    """Warn when the checkpoint's casing does not suit the data.

    Two signals: the casing flag disagrees with the vocabulary itself (an uncased vocab read
    case-sensitively turns capitalised words into [UNK]; a cased vocab lower-cased wastes it),
    and the share of [UNK] word pieces in the task's text is high (above 2%: BERT's own vocab
    gives well under 1% on English GLUE / SQuAD text)."""
    from bertscale.tokenizer import guess_lowercase
    vocab_uncased = guess_lowercase(pretrained.vocab_path)
    if vocab_uncased != pretrained.lowercase:
        warnings.warn(
            f"{pretrained.source}: the checkpoint says lowercase={pretrained.lowercase} but its "
            f"vocabulary looks {'uncased' if vocab_uncased else 'cased'}; {what} will be "
            f"tokenized {'lower-cased' if pretrained.lowercase else 'as written'}", stacklevel=2)
    if unk_rate > 0.02:
        warnings.warn(
            f"{what}: {100 * unk_rate:.1f}% of word pieces are [UNK] with the vocabulary of "
            f"{pretrained.source} (lowercase={pretrained.lowercase}); the checkpoint's casing "
            f"or vocabulary may not match this data", stacklevel=2)


def unk_fraction(tok: Any, encodings: Iterable[Sequence[int]]) -> float:
    unk = tok.token_to_id("[UNK]")
    total = hits = 0
    for ids in encodings:
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / max(total, 1)


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """One fine-tuning run (one learning rate, one seed)."""

    lr: float = 2e-5
    """Peak learning rate (the paper sweeps 5e-5, 4e-5, 3e-5, 2e-5 on GLUE)."""
    epochs: float = 3.0
    """Passes over the training set; fractions allowed."""
    batch_size: int = 32
    """Examples per optimizer step."""
    warmup: float = 0.1
    """Fraction of the steps with a linear warmup from 0."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not on biases and LayerNorm weights)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip, as Google's run_classifier / run_squad."""
    eval_batch_size: int = 64
    """Examples per forward pass when predicting."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (a budget cap); None = the epochs decide."""
    precision: str = "auto"
    """"auto" (bf16 on a GPU that has it, else fp16 with loss scaling; fp32 on the CPU),
    "fp32", "bf16" or "fp16" (GPU only)."""
    device: str = "auto"
    """"auto", "cpu", "cuda" or "cuda:N"."""
    seed: int = 1
    """Seeds the head's initialisation, dropout and the data order."""
    log_every: int = 50
    """Print the running loss every N steps (0: never)."""
    fast: FastPaths = field(default_factory=FastPaths)
    """The encoder's optional fast paths (bertscale.model.FastPaths): unpadding is the one that
    pays in fine-tuning, whose batches are mostly padding at GLUE lengths."""


_ranks: DistEnv | None = None


def ranks(device: str = "auto") -> DistEnv:
    """This process's place in the run, discovered once (rank 0 of 1 alone); with several
    processes, start the process group (NCCL on GPUs; gloo on the CPU, or when `device` says
    "cpu") and pin this process to its GPU. The first call decides; the tasks make it with
    their --device."""
    global _ranks
    if _ranks is not None:
        return _ranks
    from bertscale.distributed import discover, init_torch
    env = discover()
    if env.world_size > 1:
        import atexit

        import torch.distributed as dist
        on_gpu = torch.cuda.is_available() and device != "cpu"
        if on_gpu:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            init_torch(env, "nccl" if on_gpu else "gloo")
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    _ranks = env
    return _ranks


def log(msg: str) -> None:
    """Progress on stderr, from rank 0 only."""
    if ranks().is_main:
        print(msg, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """"auto" is the GPU (this rank's, under a launcher) or the CPU; "cuda" under a launcher is
    this rank's GPU."""
    r = ranks()
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", r.local_rank % torch.cuda.device_count())
    if name == "auto":
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32)."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision {name!r}: choose auto, fp32, bf16 or fp16")
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")
    return torch.bfloat16 if name == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps of a run: epochs x ceil(examples / batch), capped by max_steps."""
    total = max(1, math.ceil(cfg.epochs * math.ceil(num_examples / cfg.batch_size)))
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, total: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The pretraining code's AdamW (eps 1e-6, no decay on biases and LayerNorm weights) and
    its warmup + linear-decay schedule over `total` steps."""
    from bertscale.optim import OptimizerConfig, ScheduleConfig, build_optimizer as build, \
        build_scheduler
    opt = build(OptimizerConfig(name="adamw", lr=cfg.lr, eps=1e-6, weight_decay=cfg.weight_decay,
                                implementation="fused" if device.type == "cuda" else "foreach"),
                model)
    return opt, build_scheduler(opt, ScheduleConfig(warmup=float(cfg.warmup), decay="linear"),
                                total)


Batch = dict[str, Tensor]
Feature = Mapping[str, Any]


def _lengths(ids: Any) -> list[int]:
    """A feature's sequence lengths: one, or one per choice (multiple choice)."""
    return [len(s) for s in ids] if ids and isinstance(ids[0], (list, tuple)) else [len(ids)]


def collate(features: Sequence[Feature], pad_id: int = 0) -> Batch:
    """Pad `input_ids` / `token_type_ids` to the longest sequence of the batch (the last
    axis; a feature may hold several sequences, one per choice) and stack everything else."""
    out: Batch = {}

    T = max(max(_lengths(f["input_ids"])) for f in features)
    for key in ("input_ids", "token_type_ids"):
        pad = pad_id if key == "input_ids" else 0
        rows = []
        for f in features:
            seqs = f[key] if isinstance(f[key][0], (list, tuple)) else [f[key]]
            rows.append([list(s) + [pad] * (T - len(s)) for s in seqs])
        t = torch.tensor(rows, dtype=torch.long)                 # (B, C, T)
        out[key] = t if isinstance(features[0][key][0], (list, tuple)) else t[:, 0]
    mask_rows = []
    for f in features:
        seqs = f["input_ids"] if isinstance(f["input_ids"][0], (list, tuple)) else [f["input_ids"]]
        mask_rows.append([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    m = torch.tensor(mask_rows, dtype=torch.long)
    out["attention_mask"] = m if out["input_ids"].dim() == 3 else m[:, 0]
    for key in features[0]:
        if key in ("input_ids", "token_type_ids"):
            continue
        v = [f[key] for f in features]
        out[key] = torch.tensor(v, dtype=torch.float32 if isinstance(v[0], float) else torch.long)
    return out


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def fit(model: nn.Module, features: Sequence[Feature],
        loss_fn: Callable[[nn.Module, Batch], Tensor], cfg: TrainConfig, pad_id: int = 0) -> dict[str, Any]:
    """Train `model` in place (data-parallel when started as several ranks); returns
    {"steps", "final_loss", "seconds"}, the loss being the global batch's."""
    if not features:
        raise UserError("the training set is empty")
    r = ranks()
    if cfg.batch_size < r.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and cannot be "
                        f"shared by {r.world_size} ranks; use at least {r.world_size}")
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    apply_fast_paths(model, cfg.fast)
    model.to(device).train()
    net: nn.Module = model
    if r.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        # Wrapping broadcasts rank 0's weights: every replica starts the same.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
        # Each rank its own dropout masks; rank 0 keeps the single-process stream.
        if r.rank > 0:
            torch.manual_seed(cfg.seed + 7919 * r.rank)
    total = total_steps(cfg, len(features))
    optimizer, scheduler = build_optimizer(model, cfg, device, total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    order = torch.Generator().manual_seed(cfg.seed)
    step, t0, running = 0, time.perf_counter(), []
    while step < total:
        perm = torch.randperm(len(features), generator=order).tolist()
        for i in range(0, len(perm), cfg.batch_size):
            if step >= total:
                break
            global_batch = perm[i:i + cfg.batch_size]
            mine, weight = _share(global_batch, r)
            batch = _to(collate([features[j] for j in mine], pad_id), device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = loss_fn(net, batch) * weight
            scaler.scale(loss).backward()   # DDP averages over ranks: sum of shares / W
            batch_loss = _global_mean(loss.detach(), r)
            if not torch.isfinite(batch_loss):   # the same verdict on every rank
                raise RuntimeError(f"loss became {batch_loss.item()} at step {step} "
                                   f"(lr {cfg.lr}); try a smaller learning rate or fp32")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(batch_loss.item())
            step += 1
            if cfg.log_every and step % cfg.log_every == 0:
                log(f"  step {step}/{total}  loss {np.mean(running[-cfg.log_every:]):.4f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f}s")
    return {"steps": step, "final_loss": float(np.mean(running[-min(len(running), 20):])),
            "seconds": time.perf_counter() - t0}


def _share(global_batch: list[int], r: DistEnv) -> tuple[list[int], float]:
    """This rank's contiguous share of a global batch and the weight of its mean loss.

    DDP averages gradients over the W ranks, so weighting rank k's mean loss by W * n_k / n makes
    the average the gradient of the global batch's mean loss, however unevenly a last batch
    divides. A rank left with nothing (a last batch smaller than W) still runs one example with
    weight 0: every rank must join every gradient all-reduce."""
    if r.world_size == 1:
        return global_batch, 1.0
    parts = np.array_split(np.asarray(global_batch), r.world_size)
    mine = parts[r.rank].tolist()
    if not mine:
        return global_batch[:1], 0.0
    return mine, r.world_size * len(mine) / len(global_batch)


def _global_mean(weighted_loss: Tensor, r: DistEnv) -> Tensor:
    """The global batch's mean loss from each rank's weighted share (for logs and the NaN check)."""
    if r.world_size == 1:
        return weighted_loss.float()
    import torch.distributed as dist
    total = weighted_loss.float().clone()
    dist.all_reduce(total)
    return total / r.world_size


def apply_fast_paths(model: nn.Module, fast: FastPaths) -> None:
    """Switch the encoder's fast paths; a model without a BERT encoder (the feature-mode
    tagger) has nothing to switch."""
    from bertscale.model import BertModel, set_fast_paths
    if any(isinstance(m, BertModel) for m in model.modules()):
        set_fast_paths(model, fast)


def _num_tokens(feature: Feature) -> int:
    return sum(_lengths(feature["input_ids"]))


@torch.no_grad()
def predict(model: nn.Module, features: Sequence[Feature],
            forward: Callable[[nn.Module, Batch], Tensor | tuple[Tensor, ...]],
            cfg: TrainConfig, pad_id: int = 0) -> list[np.ndarray]:
    """Run `forward` over `features`; each output concatenated along the batch as float32
    numpy, in the order of `features` (a tuple output gives one array per element, each
    (N, ...) possibly with a ragged last axis, padded with -1e4; callers slice to each
    feature's length).

    Batches are cut from the features sorted by length, so a batch pads to a length its
    members nearly share (GLUE dev sets range from a few tokens to 128): the same outputs with
    a fraction of the padded work."""
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    apply_fast_paths(model, cfg.fast)
    model.to(device).eval()
    order = sorted(range(len(features)), key=lambda i: _num_tokens(features[i]))
    r = ranks()
    starts = list(range(0, len(order), cfg.eval_batch_size))
    chunks: dict[int, list[np.ndarray]] = {}
    for b in range(r.rank, len(starts), r.world_size):   # batches dealt round the ranks
        part = [features[j] for j in order[starts[b]:starts[b] + cfg.eval_batch_size]]
        batch = _to(collate(part, pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = forward(model, batch)
        outs = out if isinstance(out, tuple) else (out,)
        chunks[b] = [o.float().cpu().numpy() for o in outs]
    if r.world_size > 1:
        import torch.distributed as dist
        gathered: list[dict[int, list[np.ndarray]] | None] = [None] * r.world_size
        dist.all_gather_object(gathered, chunks)
        chunks = {b: c for g in gathered for b, c in (g or {}).items()}
    chunks_in_order = [chunks[b] for b in range(len(starts))]
    model.train()
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    result = []
    for j in range(len(chunks_in_order[0]) if chunks_in_order else 0):
        arrays = [c[j] for c in chunks_in_order]
        if arrays[0].ndim >= 2:    # ragged last axis across batches: pad with -inf-like
            width = max(a.shape[-1] for a in arrays)
            arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])],
                             constant_values=-1e4) for a in arrays]
        result.append(np.concatenate(arrays, axis=0)[inverse])
    return result


# ------------------------------------------------------------------ grid and result files


def parse_list(text: str, kind: type, flag: str) -> list[Any]:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a comma-separated list of "
                        f"{kind.__name__}s") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


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
    per_lr = {}
    for lr, rs in by_lr.items():
        names = [k for k in rs[0].metrics if all(k in r.metrics for r in rs)]
        per_lr[lr] = {k: {"mean": statistics.fmean(r.metrics[k] for r in rs),
                          "std": statistics.stdev(r.metrics[k] for r in rs) if len(rs) > 1 else 0.0}
                      for k in names}
    best_lr = max(per_lr, key=lambda lr: per_lr[lr][main_metric]["mean"])
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


def console_line(summary: Mapping[str, Any], names: Sequence[str], seconds: float,
                 scale: float = 100.0) -> str:
    """`MRPC  f1 88.1 ± 0.4  accuracy 84.2 ± 0.5  (3 seeds, lr 2e-05, 412 s)`."""
    parts = [summary["task"]]
    for n in names:
        m = summary["metrics"].get(n)
        if m is not None:
            parts.append(f"{n} {scale * m['mean']:.1f} ± {scale * m['std']:.1f}")
    seeds = sum(1 for r in summary["runs"] if r["lr"] == summary["best_lr"])
    parts.append(f"({seeds} seed{'s' if seeds != 1 else ''}, lr {summary['best_lr']:g}, "
                 f"{seconds:.0f} s)")
    return "  ".join(parts)


def run_folder(out_dir: Path, lr: float, seed: int) -> Path:
    return out_dir / "runs" / f"lr{lr:g}-seed{seed}"


TrainOne = Callable[[TrainConfig, Path], tuple[dict[str, float], dict[str, Any]]]


def run_grid(task: str, out_dir: Path, lrs: Sequence[float], seeds: Sequence[int],
             base: TrainConfig, num_train: int, unit: str, train_one: TrainOne) -> list[RunResult]:
    """One run per (learning rate, seed): seed everything, then `train_one(cfg, folder)` builds
    its model, trains, predicts, writes its prediction files into `folder` and returns
    (dev metrics, training stats); the run's results.json is written here. The model is local
    to `train_one`, so one run's weights are freed before the next is built."""
    runs: list[RunResult] = []
    for lr in lrs:
        for seed in seeds:
            cfg = dataclasses.replace(base, lr=lr, seed=seed)
            log(f"{task}: lr {lr:g} seed {seed}: {num_train} {unit}, {cfg.epochs:g} epochs = "
                f"{total_steps(cfg, num_train)} steps, batch {cfg.batch_size}")
            seed_everything(seed)
            folder = run_folder(out_dir, lr, seed)
            metrics, stats = train_one(cfg, folder)
            write_json_atomic(folder / "results.json", {"task": task, "lr": lr, "seed": seed,
                                                        "metrics": metrics, "train": stats})
            runs.append(RunResult(lr, seed, metrics, folder, stats))
    return runs


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The grid's shared settings, for results.json."""
    fast = {k: v for k, v in dataclasses.asdict(cfg.fast).items() if not callable(v)}
    return {**{k: getattr(cfg, k) for k in ("epochs", "batch_size", "warmup", "weight_decay",
                                            "max_grad_norm", "max_steps", "precision")},
            "fast_paths": fast}


def finish(task: str, main_metric: str, runs: Sequence[RunResult], out_dir: Path,
           files: Iterable[str], base: TrainConfig, started: float, names: Sequence[str],
           scale: float = 100.0, **extra: Any) -> dict[str, Any]:
    """Summarise the grid, publish the chosen run's prediction files, write the task's
    results.json and print its console line; returns the summary."""
    summary = summarize(task, main_metric, runs)
    best = run_folder(out_dir, summary["best_lr"], summary["best_seed"])
    published = publish(best, out_dir, files)
    summary.update(extra, recipe=recipe(base), predictions=[p.name for p in published],
                   world_size=ranks().world_size, seconds=time.perf_counter() - started)
    write_json_atomic(out_dir / "results.json", summary)
    if ranks().is_main:
        print(console_line(summary, names, summary["seconds"], scale), flush=True)
    return summary


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` atomically, on rank 0 only (every rank computes the same results)."""
    if not ranks().is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def publish(best_folder: Path, out_dir: Path, names: Iterable[str]) -> list[Path]:
    """Copy the chosen run's prediction files up to the task folder (atomically; rank 0)."""
    copied: list[Path] = []
    if not ranks().is_main:
        return copied
    for name in names:
        src = best_folder / name
        if src.is_file():
            dst = out_dir / name
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
            copied.append(dst)
    return copied
