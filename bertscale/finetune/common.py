"""What every fine-tuning task shares: building models from checkpoints, the training loop, the
seed / learning-rate grid, progress and metrics, and result files.

Checkpoints (bertscale.pretrained, the loader `bertscale.from_pretrained` is): a Hugging Face
BERT folder (config.json + weights + vocab.txt) or a bertscale pretraining run / checkpoint
directory (any ZeRO stage, consolidated on load, no converter to run by hand). The vocabulary
and casing always come with the checkpoint.

Reporting (bertscale.reporting, as pretraining): a progress bar with ETA on a terminal for the
training steps and every prediction pass, plain lines otherwise; every step's loss, lr and
gradient norm in the run folder's metrics.jsonl, and to W&B / TensorBoard when asked.

A grid is resumable: a run whose results.json is written is finished and skipped on a re-run;
an unfinished one continues from its train_state.pt (--checkpoint-every). OUT/<task>/settings.json
names the settings a folder's results belong to; other settings are refused (or cleared with
--overwrite), so results of two settings never mix.

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
  included, with bertscale_task.json), since a learning-rate x seed grid would otherwise write
  one model per run. A finished run skipped on a re-run is not saved again.
- A resumed run restores rank 0's random stream only: with several ranks and dropout, the
  resumed run is equal in distribution, not bit for bit (with one rank, or dropout off, it is
  the uninterrupted run).
- The paper picks the best learning rate on the dev set; so do we, which means the dev score of
  the chosen setting is optimistic in the same way the paper's is.
"""

from __future__ import annotations

import dataclasses
import json
import math
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

from bertscale.devices import resolve_device, resolve_precision
from bertscale.distributed import DistEnv, gather_problems
from bertscale.errors import UserError
from bertscale.files import DiskFullError, copy_atomic, torch_save_atomic, write_text_atomic
from bertscale.parallelize import FastPaths
from bertscale.pretrained import TASK_FILE, Pretrained, build, load_checkpoint  # noqa: F401 - re-exported
from bertscale.reporting import MetricSinks, Progress
from bertscale.seeding import rng_state, seed_all, set_rng_state

# ------------------------------------------------------------------------ checkpoints


def build_model(head: Callable[..., nn.Module], pretrained: Pretrained, **kwargs: Any) -> nn.Module:
    """`head` on the pretrained encoder (bertscale.pretrained.build, as `from_pretrained`);
    a head the checkpoint lacks starts from init, a fine-tuned head of the same shape is kept."""
    model, fresh = build(pretrained, head, **kwargs)
    missing_pooler = [k for k in fresh if ".pooler." in k]
    if missing_pooler:
        log(f"note: {pretrained.source} has no pooler weights; the [CLS] pooler starts from "
            f"a random initialisation and is trained with the head")
    return model


def save_model(model: nn.Module, pretrained: Pretrained, folder: Path, architecture: str,
               task: Mapping[str, Any] | None = None) -> Path:
    """The fine-tuned model, head included, as a Hugging Face folder (`folder`/model), written
    by rank 0 (the replicas are identical), with `task` (what the head was trained for: task,
    labels, recipe, lengths) as bertscale_task.json, which `--eval-only`, `finetune predict`
    and `bertscale.from_pretrained` read back."""
    from bertscale.hf import export_hf
    if not ranks().is_main:
        return folder / "model"
    out = export_hf(model.state_dict(), pretrained.config, pretrained.vocab_path,
                    pretrained.lowercase, folder / "model", architecture=architecture,
                    overwrite=True, source=f"fine-tuned from {pretrained.source}")
    if task is not None:
        write_json_on_main(out / TASK_FILE, {**task, "fine_tuned_from": pretrained.source})
    return out


def load_task_info(folder: Path) -> dict[str, Any] | None:
    """bertscale_task.json of a fine-tuned model folder, without loading its weights."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def finetuned_task(pretrained: Pretrained, family: str) -> dict[str, Any]:
    """The saved task of a `--save-model` folder, for --eval-only / predict; a clear error for
    any other checkpoint or another task family."""
    if pretrained.task is None:
        raise UserError(f"{pretrained.source}: no {TASK_FILE}, so not a fine-tuned model; "
                        f"--eval-only and predict need a folder written by `finetune ... "
                        f"--save-model` (OUTPUT_DIR/<task>/runs/<run>/model)")
    if pretrained.task.get("family") != family:
        raise UserError(f"{pretrained.source}: fine-tuned for {pretrained.task.get('task')} "
                        f"({pretrained.task.get('family')}), not a {family} task")
    return pretrained.task


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


def check_casing(pretrained: Pretrained, unk_rate: float, what: str,
                 texts: Iterable[str] = ()) -> None:
    """Warn when the checkpoint's casing does not suit the data.

    Three signals: the casing flag disagrees with the vocabulary itself (an uncased vocab read
    case-sensitively turns capitalised words into [UNK]; a cased vocab lower-cased wastes it);
    the share of [UNK] word pieces in the task's text is high (above 2%: BERT's own vocab
    gives well under 1% on English GLUE / SQuAD text); and the casing of the text itself
    (`texts`, a sample of it): cased text (over 5% of the words after a sentence's first are
    capitalised: names, places) given an uncased checkpoint loses its case before
    tokenization, and all-lower-case text given a cased checkpoint never uses its capitals."""
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
    capitalised, letters_upper, words = _text_casing(texts)
    if not words:
        return
    if pretrained.lowercase and capitalised > 0.05:
        warnings.warn(
            f"{what} is cased ({100 * capitalised:.0f}% of words after the first of a line are "
            f"capitalised) but {pretrained.source} is uncased: the text is lower-cased before "
            f"tokenization and its case is lost (fine for most GLUE tasks; named entities and "
            f"other case-sensitive tasks do better with a cased checkpoint)", stacklevel=2)
    if not pretrained.lowercase and letters_upper == 0:
        warnings.warn(
            f"{what} is all lower-case but {pretrained.source} is cased: its capitalised "
            f"vocabulary goes unused and the text reads unlike its pretraining data; an "
            f"uncased checkpoint suits this data better", stacklevel=2)


def _text_casing(texts: Iterable[str]) -> tuple[float, int, int]:
    """(share of non-initial words starting with a capital, upper-case letters, words)."""
    capital = later = upper = words = 0
    for text in texts:
        ws = text.split()
        words += len(ws)
        upper += sum(c.isupper() for c in text)
        for w in ws[1:]:
            if w[:1].isalpha():
                later += 1
                capital += w[0].isupper()
    return capital / max(later, 1), upper, words


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
    """The encoder's fast paths (bertscale.parallelize.FastPaths): unpadding is the one that
    pays in fine-tuning, whose batches are mostly padding at GLUE lengths."""
    progress: str = "auto"
    """"auto" (a progress bar with ETA when stderr is a terminal, plain lines otherwise), "bar"
    or "plain"."""
    wandb: bool = False
    """Log each run to Weights & Biases (offline without an API key; never stops the run)."""
    tensorboard: bool = False
    """Also write TensorBoard events to the run folder (needs the tensorboard package)."""
    checkpoint_every: int = 0
    """Save the run's training state every N steps (0: never) so that a re-run continues it."""
    overwrite: bool = False
    """Clear an output folder that holds results of other settings instead of refusing it."""
    run: RunContext | None = field(default=None, compare=False, repr=False)
    """Set by run_grid for each (lr, seed) run: where its files go and what it reports to."""


@dataclass
class RunContext:
    """One grid run's folder, its name in progress lines and its metric sinks."""

    folder: Path
    name: str
    sinks: Any = None


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


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def fit(model: nn.Module, features: Sequence[Feature],
        loss_fn: Callable[[nn.Module, Batch], Tensor], cfg: TrainConfig, pad_id: int = 0) -> dict[str, Any]:
    """Train `model` in place (data-parallel when started as several ranks); returns
    {"steps", "loss_last_step", "loss_last20_mean", "seconds", "resumed_from_step"}, the losses
    being the global batch's.

    Every step's loss and learning rate go to the run's metric sinks; the progress line shows
    the mean loss of the last --log-every steps. With cfg.checkpoint_every, the training state
    (weights, AdamW moments, schedule, loss scaler, the losses so far, rank 0's RNG) is saved
    atomically in the run folder every N steps, and a run that finds it there continues from
    it: the data order is replayed from the seed, so the resumed run sees the batches an
    uninterrupted one would have."""
    if not features:
        raise UserError("the training set is empty")
    r = ranks()
    if cfg.batch_size < r.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and cannot be "
                        f"shared by {r.world_size} ranks; use at least {r.world_size}")
    device = resolve_device(cfg.device, ranks().local_rank)
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
            seed_all(cfg.seed + 7919 * r.rank)
    total = total_steps(cfg, len(features))
    optimizer, scheduler = build_optimizer(model, cfg, device, total)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = TrainState(cfg, total, len(features))
    running: list[float] = []
    start = state.load(model, optimizer, scheduler, scaler, running)
    name = cfg.run.name if cfg.run else "train"
    sinks = cfg.run.sinks if cfg.run else None
    bar = Progress(f"{name} train", total, "steps", mode=cfg.progress, every=cfg.log_every,
                   enabled=r.is_main)
    if start:
        bar.note(f"{name}: resuming from the step-{start} checkpoint in {state.path.parent}")
    if sinks is not None:   # one record per step, also after a run killed before its checkpoint
        sinks.rewind(start)
    order = torch.Generator().manual_seed(cfg.seed)
    step = 0
    while step < total:
        perm = torch.randperm(len(features), generator=order).tolist()
        for i in range(0, len(perm), cfg.batch_size):
            if step >= total:
                break
            if step < start:     # replaying the data order up to the checkpoint
                step += 1
                continue
            global_batch = perm[i:i + cfg.batch_size]
            mine, weight = _share(global_batch, r)
            batch = to_device(collate([features[j] for j in mine], pad_id), device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = loss_fn(net, batch) * weight
            scaler.scale(loss).backward()   # DDP averages over ranks: sum of shares / W
            batch_loss = _global_mean(loss.detach(), r)
            if not torch.isfinite(batch_loss):   # the same verdict on every rank
                raise RuntimeError(f"loss became {batch_loss.item()} at step {step} "
                                   f"(lr {cfg.lr}); try a smaller learning rate or fp32")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(batch_loss.item())
            step += 1
            if sinks is not None:
                sinks.record("train", step, {"loss": running[-1], "lr": lr,
                                             "grad_norm": float(grad_norm)})
            window = running[-max(cfg.log_every, 1):]
            bar.update(step, loss=float(np.mean(window)), lr=float(lr))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                state.save(step, model, optimizer, scheduler, scaler, running)
    seconds = bar.close(f"loss {float(np.mean(running[-min(len(running), 20):])):.4f} "
                        f"(mean of the last {min(len(running), 20)} steps)")
    return {"steps": step, "loss_last_step": running[-1],
            "loss_last20_mean": float(np.mean(running[-min(len(running), 20):])),
            "seconds": seconds, "resumed_from_step": start}


class TrainState:
    """A run's training state in its folder (train_state.pt), for --checkpoint-every.

    Written by rank 0 (the replicas are identical) through a temporary file and a rename, so
    a process killed while saving leaves the previous state. A state saved for other settings
    (learning rate, seed, steps, training set size) is not used. Only rank 0's RNG is saved:
    with several ranks, the other ranks' dropout streams restart on resume, so a resumed
    multi-rank run with dropout is equal in distribution, not bit for bit."""

    def __init__(self, cfg: TrainConfig, total: int, num_features: int):
        self.path = (cfg.run.folder / "train_state.pt") if cfg.run else None
        self.enabled = bool(cfg.checkpoint_every and self.path is not None)
        self.key = {"lr": cfg.lr, "seed": cfg.seed, "total_steps": total,
                    "batch_size": cfg.batch_size, "examples": num_features}

    def save(self, step: int, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
             running: list[float]) -> None:
        if not self.enabled:
            return
        problem = None
        if ranks().is_main:
            blob = {"key": self.key, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "running": running,
                    "rng": rng_state()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch_save_atomic(blob, self.path)
            except DiskFullError as e:   # the previous state is intact
                problem = str(e)
        # Every rank stops with rank 0's line, rather than waiting for it in the next all-reduce.
        problems = gather_problems([problem] if problem else [])
        if problems:
            raise UserError(problems[0])

    def load(self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
             running: list[float]) -> int:
        """Restore a saved state into the given objects; returns its step (0: none)."""
        if not self.enabled or not self.path.is_file():
            return 0
        blob = torch.load(self.path, map_location="cpu", weights_only=False)
        if blob.get("key") != self.key:
            log(f"note: {self.path} was saved for other settings ({blob.get('key')}); "
                f"starting this run from step 0")
            return 0
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        scaler.load_state_dict(blob["scaler"])
        running.extend(blob["running"])
        if ranks().is_main:
            set_rng_state(blob["rng"])
        return int(blob["step"])

    def remove(self) -> None:
        if self.path is not None and ranks().is_main:
            self.path.unlink(missing_ok=True)


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
    from bertscale import parallelize
    from bertscale.model import BertModel
    if any(isinstance(m, BertModel) for m in model.modules()):
        parallelize.apply_fast_paths(model, fast)


def _num_tokens(feature: Feature) -> int:
    return sum(_lengths(feature["input_ids"]))


@torch.no_grad()
def predict(model: nn.Module, features: Sequence[Feature],
            forward: Callable[[nn.Module, Batch], Tensor | tuple[Tensor, ...]],
            cfg: TrainConfig, pad_id: int = 0, what: str = "predict") -> list[np.ndarray]:
    """Run `forward` over `features`; each output concatenated along the batch as float32
    numpy, in the order of `features` (a tuple output gives one array per element, each
    (N, ...) possibly with a ragged last axis, padded with -1e4; callers slice to each
    feature's length).

    Batches are cut from the features sorted by length, so a batch pads to a length its
    members nearly share (GLUE dev sets range from a few tokens to 128): the same outputs with
    a fraction of the padded work. `what` names the pass in its progress line ("dev", "test")."""
    device = resolve_device(cfg.device, ranks().local_rank)
    amp_dtype = resolve_precision(cfg.precision, device)
    apply_fast_paths(model, cfg.fast)
    model.to(device).eval()
    order = sorted(range(len(features)), key=lambda i: _num_tokens(features[i]))
    r = ranks()
    starts = list(range(0, len(order), cfg.eval_batch_size))
    chunks: dict[int, list[np.ndarray]] = {}
    mine = range(r.rank, len(starts), r.world_size)      # batches dealt round the ranks
    bar = Progress(f"{cfg.run.name if cfg.run else 'predict'} {what}", len(mine), "batches",
                   mode=cfg.progress, enabled=r.is_main)
    for done, b in enumerate(mine, start=1):
        part = [features[j] for j in order[starts[b]:starts[b] + cfg.eval_batch_size]]
        batch = to_device(collate(part, pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = forward(model, batch)
        outs = out if isinstance(out, tuple) else (out,)
        chunks[b] = [o.float().cpu().numpy() for o in outs]
        bar.update(done)
    bar.close(f"{len(features)} examples")
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
                          # the spread of one run is undefined, not zero
                          "std": statistics.stdev(r.metrics[k] for r in rs) if len(rs) > 1 else None}
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


def run_folder(out_dir: Path, lr: float, seed: int) -> Path:
    return out_dir / "runs" / f"lr{lr:g}-seed{seed}"


TrainOne = Callable[[TrainConfig, Path], tuple[dict[str, float], dict[str, Any]]]


def grid_settings(task: str, base: TrainConfig, num_train: int,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a run's result besides its (lr, seed): two grids with equal settings can
    share an output folder, and their finished runs are interchangeable."""
    return json.loads(json.dumps({"task": task, **settings, "train_examples": num_train,
                                  "recipe": recipe(base)}, default=str))


def check_output_dir(out_dir: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
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
            if ranks().is_main:
                shutil.rmtree(out_dir)
    elif overwrite and out_dir.is_dir() and ranks().is_main:
        shutil.rmtree(out_dir)
    elif (out_dir / "runs").is_dir() and not overwrite:
        raise UserError(f"{out_dir} holds runs without a settings.json (an older bertscale); "
                        f"use another --output-dir, or --overwrite to delete them")
    barrier()
    write_json_on_main(path, settings)


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


def barrier() -> None:
    if ranks().world_size > 1:
        import torch.distributed as dist
        dist.barrier()


def run_grid(task: str, out_dir: Path, lrs: Sequence[float], seeds: Sequence[int],
             base: TrainConfig, num_train: int, unit: str, train_one: TrainOne,
             settings: Mapping[str, Any]) -> list[RunResult]:
    """One run per (learning rate, seed): seed everything, then `train_one(cfg, folder)` builds
    its model, trains, predicts, writes its prediction files into `folder` and returns
    (dev metrics, training stats); the run's results.json is written here and marks it
    finished: a re-run of the grid in the same folder skips it, and continues an unfinished
    run from its last training-state checkpoint (--checkpoint-every). The model is local to
    `train_one`, so one run's weights are freed before the next is built."""
    check_output_dir(out_dir, grid_settings(task, base, num_train, settings), base.overwrite)
    runs: list[RunResult] = []
    for lr in lrs:
        for seed in seeds:
            folder = run_folder(out_dir, lr, seed)
            done = folder / "results.json"
            if done.is_file():
                prev = json.loads(done.read_text(encoding="utf-8"))
                log(f"{task}: lr {lr:g} seed {seed}: finished earlier ({done}); skipped")
                runs.append(RunResult(lr, seed, prev["metrics"], folder, prev["train"]))
                continue
            name = f"{task} lr {lr:g} seed {seed}"
            cfg = dataclasses.replace(base, lr=lr, seed=seed)
            uncapped = total_steps(dataclasses.replace(cfg, max_steps=None), num_train)
            steps = total_steps(cfg, num_train)
            plan = (f"{cfg.epochs:g} epochs = {uncapped} steps" if steps == uncapped else
                    f"{steps} steps (--max-steps; {cfg.epochs:g} epochs would be {uncapped})")
            log(f"{task}: lr {lr:g} seed {seed}: {num_train} {unit}, {plan}, batch "
                f"{cfg.batch_size}")
            sinks = MetricSinks(folder, enabled=ranks().is_main, wandb=base.wandb,
                                tensorboard=base.tensorboard, project="bertscale-finetune",
                                name=f"{task}-lr{lr:g}-seed{seed}", group=task,
                                wandb_config={"task": task, "lr": lr, "seed": seed,
                                              **recipe(base)}, warn=lambda m: log(f"warning: {m}"))
            cfg.run = RunContext(folder, name, sinks)
            seed_all(seed)
            try:
                metrics, stats = train_one(cfg, folder)
                sinks.record("eval", stats["steps"], metrics)
            finally:
                sinks.close()
            write_json_on_main(done, {"task": task, "lr": lr, "seed": seed,
                                      "metrics": metrics, "train": stats,
                                      **{k: v for k, v in settings.items()
                                         if k.startswith("checkpoint")}})
            TrainState(cfg, 0, 0).remove()
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
    results.json and print its lr x seed table and console line; returns the summary."""
    summary = summarize(task, main_metric, runs)
    best = run_folder(out_dir, summary["best_lr"], summary["best_seed"])
    published = publish(best, out_dir, files)
    summary.update(extra, recipe=recipe(base), predictions=[p.name for p in published],
                   world_size=ranks().world_size, seconds=time.perf_counter() - started)
    write_json_on_main(out_dir / "results.json", summary)
    if ranks().is_main:
        print(grid_table(summary, names, scale), flush=True)
        print(console_line(summary, names, summary["seconds"], scale), flush=True)
    return summary


def write_text_on_main(path: Path, text: str) -> None:
    """Rank 0 writes `path` atomically (bertscale.files); the other ranks, which computed the same
    results, write nothing."""
    if ranks().is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


def write_json_on_main(path: Path, data: Any) -> None:
    write_text_on_main(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def publish(best_folder: Path, out_dir: Path, names: Iterable[str]) -> list[Path]:
    """Copy the chosen run's prediction files up to the task folder (atomically; rank 0)."""
    copied: list[Path] = []
    if not ranks().is_main:
        return copied
    for name in names:
        src = best_folder / name
        if src.is_file():
            copy_atomic(src, out_dir / name)
            copied.append(out_dir / name)
    return copied
