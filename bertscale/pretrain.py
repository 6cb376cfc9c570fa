"""`bertscale pretrain`: BERT's masked-LM + next-sentence pretraining through DeepSpeed ZeRO.

Read top to bottom: plan (everything validated before any process group) -> process group ->
model, optimizer, schedule, engine -> resume or init_from -> the step loop (micro-batches with
gradient accumulation, one all-reduce of the step's statistics, optimizer step, logging, eval,
checkpoint, preemption) -> exit code.

One launcher-agnostic entrypoint: `torchrun`, `deepspeed`, `mpirun` and `srun` all work, see
bertscale.distributed. Exit codes: 0 done; 2 bad input (before anything ran); 3 the loss or the
weights became NaN/inf (nothing saved for that step); 75 preempted after committing a checkpoint
(SLURM scripts requeue on it).

Honest limits:
- The batch geometry is global_batch = micro x accumulation x world size exactly; no dropping.
- fp16 needs a GPU (DeepSpeed refuses it on the CPU); on the CPU train in fp32 or bf16 (bf16 is
  emulated on CPUs without native bf16 and is many times slower there).
- With ZeRO-Offload the optimizer is the recipe's torch optimizer running on the CPU partitions,
  not DeepSpeed's CPU Adam kernel: correct, slower than DeepSpeed's own offload path.
- Model FLOPs (for TFLOP/s and MFU) are bertscale.perf's one count: matmuls on the real
  (non-padding) tokens only, attention over each sequence's real length, the MLM head at the
  masked positions; embeddings, norms, softmax and padding are not counted. MFU is against
  `logging.peak_tflops`, else the CUDA device's datasheet peak (bertscale.perf.datasheet_peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale import checkpoint as ckpt_lib
from bertscale import distributed, runlock
from bertscale import resume as resume_lib
from bertscale import steps as steps_lib
from bertscale.config import (ModelConfig, PretrainRecipe, load_pretrain_recipe, padded_vocab_size,
                              recipe_to_dict, to_dict)
from bertscale.errors import ConfigError, UserError
from bertscale.reporting import MetricSinks
from bertscale.reporting import hms as _hms
from bertscale.seeding import seed_all

# The built-in DeepSpeed JSONs ship inside the package (bertscale/deepspeed_configs: in the
# repository a symlink to the top-level deepspeed_configs/, in a wheel the files themselves), so
# an installed bertscale finds them from any folder. BERTSCALE_DEEPSPEED_CONFIGS points elsewhere.
DEEPSPEED_CONFIG_DIR = Path(os.environ.get("BERTSCALE_DEEPSPEED_CONFIGS",
                                           Path(__file__).parent / "deepspeed_configs"))
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


# =============================================================================== the plan
# Everything a run needs to know, checked before a process group exists, so a bad recipe, batch,
# manifest or resume fails in seconds with one clear message instead of N tracebacks.


@dataclass
class Plan:
    recipe: PretrainRecipe
    env: distributed.DistEnv
    run_dir: Path
    manifest: Any                      # bertscale.data.shards.Manifest
    model_config: ModelConfig
    tokenizer_hash: str
    ds_config: dict[str, Any]          # what deepspeed.initialize gets, batch fields injected
    ds_config_path: Path
    precision: str                     # "fp32" | "bf16" | "fp16"
    zero_stage: int
    grad_accum: int
    resume_from: resume_lib.ResumePoint | None
    init_from: ckpt_lib.Committed | None
    stop_at_step: int | None


def resolve_deepspeed_config(value: str) -> Path:
    """A DeepSpeed JSON given by path, or by name: ./deepspeed_configs/NAME.json (a user's edited
    copy in the current folder) first, then the built-in DEEPSPEED_CONFIG_DIR/NAME.json."""
    path = Path(value)
    candidates = [path] if path.suffix == ".json" or "/" in value else []
    candidates += [Path("deepspeed_configs") / f"{value}.json", DEEPSPEED_CONFIG_DIR / f"{value}.json"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
    builtin = f"built-in configs: {', '.join(known)}" if known else f"no built-in configs in {DEEPSPEED_CONFIG_DIR}"
    raise ConfigError(f"train.deepspeed = {value!r}: no such file; {builtin}")


def deepspeed_config(recipe: PretrainRecipe, world_size: int,
                     cuda: bool) -> tuple[dict[str, Any], Path, str, int, int]:
    """Read the DeepSpeed JSON and inject the batch fields derived from the recipe."""
    t = recipe.train
    path = resolve_deepspeed_config(t.deepspeed)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    # The global batch is the recipe's at every world size (also after an elastic resume);
    # when it cannot be split, the error lists the world sizes that would work.
    from bertscale.elastic import plan_batch
    try:
        accum = plan_batch(t.global_batch_size, t.micro_batch_size, world_size)
    except ConfigError as e:
        raise ConfigError(f"train.global_batch_size / train.micro_batch_size: {e}") from None
    derived = dict(zip(_BATCH_KEYS, (t.global_batch_size, t.micro_batch_size, accum)))
    for key, value in derived.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise ConfigError(f"{path}: sets {key} = {cfg[key]}, but the recipe gives {value} "
                              f"(global {t.global_batch_size} = micro {t.micro_batch_size} x accumulation "
                              f"{accum} x {world_size} ranks); remove the batch fields from the JSON")
    for key, section in (("optimizer", "[optimizer]"), ("scheduler", "[schedule]")):
        if key in cfg:
            raise ConfigError(f"{path}: has a {key!r} section; the recipe's {section} defines it "
                              f"(remove it from the JSON)")
    cfg.update(derived)
    fp16 = bool(cfg.get("fp16", {}).get("enabled", False))
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError(f"{path}: enables both fp16 and bf16")
    if fp16 and not cuda:
        raise ConfigError(f"{path}: enables fp16, which DeepSpeed supports only on GPUs; on the CPU "
                          f"use a bf16 or fp32 config (e.g. train.deepspeed = "
                          f"\"{path.stem.replace('fp16', 'bf16')}\")")
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    # A client (torch) optimizer under ZeRO is "untested" in DeepSpeed's words; ours are tested.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg, path, "fp16" if fp16 else "bf16" if bf16 else "fp32", stage, accum


def build_plan(recipe: PretrainRecipe, env: distributed.DistEnv, run_dir: Path, resume: str,
               stop_at_step: int | None = None) -> Plan:
    import dataclasses

    import torch

    from bertscale.data.shards import read_manifest

    manifest = read_manifest(recipe.data.manifest, shard_base=recipe.data.shard_base,
                             cache_dir=recipe.data.cache_dir)
    vocab_file, vocab_size = Path(manifest.vocab_file), manifest.vocab_size
    # The manifest's tokenizer hash is the tokenizer's identity for resumes and init_from.
    tokenizer_hash = manifest.tokenizer_hash
    model = recipe.model
    if not recipe.vocab_size_explicit:
        model = dataclasses.replace(model, vocab_size=padded_vocab_size(
            vocab_size, recipe.fast.pad_vocab_multiple))
    elif model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size {model.vocab_size} is smaller than the manifest's "
                          f"vocabulary ({vocab_size} tokens in {vocab_file})")
    if manifest.seq_len > model.max_position_embeddings:
        raise ConfigError(f"the shards hold {manifest.seq_len}-token sequences but "
                          f"model.max_position_embeddings is {model.max_position_embeddings}")
    if manifest.num_samples("train") < recipe.train.global_batch_size:
        raise UserError(f"{manifest.path}: the train split has {manifest.num_samples('train')} samples, "
                        f"fewer than one global batch ({recipe.train.global_batch_size})")
    if manifest.num_samples("eval") == 0:
        raise UserError(f"{manifest.path}: the eval split has no samples (prepare with an "
                        f"eval fraction above 0)")
    if recipe.eval.samples > manifest.num_samples("eval") and env.is_main:
        # Still the same samples on any number of ranks: all of them.
        print(f"warning: eval.samples = {recipe.eval.samples}, but the eval split of "
              f"{manifest.path} has {manifest.num_samples('eval')} samples: evaluating on all of "
              f"them", file=sys.stderr, flush=True)
    # A sequence of T tokens has T - 3 maskable tokens ([CLS] and two [SEP]) at most.
    maskable = manifest.seq_len - 3
    if recipe.data.max_predictions_per_seq > maskable:
        raise ConfigError(f"data.max_predictions_per_seq = {recipe.data.max_predictions_per_seq} "
                          f"is more than the {maskable} maskable tokens of a {manifest.seq_len}-token "
                          f"sequence in {manifest.path} (the paper: 20 at 128, 80 at 512)")
    from bertscale.optim import warmup_steps
    if warmup_steps(recipe.schedule, recipe.train.steps) > recipe.train.steps:
        raise ConfigError(f"schedule.warmup {recipe.schedule.warmup} is longer than train.steps "
                          f"{recipe.train.steps}")
    if recipe.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("logging.tensorboard = true (--tensorboard) needs the tensorboard "
                              "package: pip install 'bertscale[tensorboard]'") from None
    ds_config, ds_path, precision, stage, accum = deepspeed_config(
        recipe, env.world_size, cuda=torch.cuda.is_available())

    # Resume: the newest committed checkpoint of this run folder, if it is the same run.
    resume_point = resume_lib.find(run_dir, resume, resume_lib.Identity(
        tokenizer_hash, manifest.fingerprint, model))
    init_from = None
    if recipe.train.init_from is not None and resume_point is None:
        init_from = ckpt_lib.resolve(recipe.train.init_from)
        ckpt_lib.check_compatible(ckpt_lib.read_state(init_from), tokenizer_hash=tokenizer_hash,
                                  manifest_fingerprint=None, model_config=model,
                                  where=f"train.init_from {init_from.path}")
    run_vocab = run_dir / ckpt_lib.VOCAB_FILE
    if run_vocab.is_file() and run_vocab.read_bytes() != vocab_file.read_bytes():
        raise UserError(f"{run_vocab}: this run folder was started with another vocabulary than "
                        f"{vocab_file}; use a new --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"{run_dir}: run folder is not writable")
    return Plan(recipe, env, run_dir, manifest, model, tokenizer_hash, ds_config, ds_path,
                precision, stage, accum, resume_point, init_from, stop_at_step)


# ================================================================================ metrics


class Reporter:
    """Rank 0's outputs: terminal (bar or plain lines), metrics.jsonl, W&B, TensorBoard. Every
    optional sink fails soft: a warning, never a crashed or stalled job."""

    def __init__(self, plan: Plan, start_step: int):
        self.plan, self.main = plan, plan.env.is_main
        self.total = plan.recipe.train.steps
        self.start_step = start_step
        self.t_start: float | None = None
        lg = plan.recipe.logging
        self.bar = self.main and (lg.progress == "bar" or (lg.progress == "auto" and sys.stdout.isatty()))
        self.bar_open = False
        # metrics.jsonl, W&B and TensorBoard: the sinks fine-tuning writes through too.
        self.sinks = MetricSinks(plan.run_dir, enabled=self.main, wandb=lg.wandb,
                                 tensorboard=lg.tensorboard, project=lg.wandb_project,
                                 name=plan.recipe.name, wandb_config=recipe_to_dict(plan.recipe),
                                 wandb_mode=lg.wandb_mode, warn=self.warn)

    def warn(self, msg: str) -> None:
        if self.main:
            self._end_bar()
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def info(self, msg: str) -> None:
        if self.main:
            self._end_bar()
            print(msg, flush=True)

    def _end_bar(self) -> None:
        if self.bar_open:
            sys.stdout.write("\n")
            self.bar_open = False

    def record(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.sinks.record(kind, step, values)

    def train_step(self, step: int, values: dict[str, float], log_now: bool) -> None:
        if not self.main:
            return
        if self.t_start is None:  # the first step pays for warm-up; ETA counts from its end
            self.t_start, self.t_first = time.monotonic(), step
        if log_now:
            self.record("train", step, values)
        done = step - self.t_first
        eta = (time.monotonic() - self.t_start) / done * (self.total - step) if done else float("nan")
        line = (f"step {step}/{self.total}  loss {values['loss']:.4f}  mlm_acc {values['mlm_acc']:.3f}  "
                f"lr {values['lr']:.2e}  {values['samples_per_s']:.1f} samples/s  ETA {_hms(eta)}")
        if self.bar:
            width = 24
            fill = int(width * step / self.total)
            sys.stdout.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {line}\x1b[K")
            sys.stdout.flush()
            self.bar_open = True
        elif log_now:
            print(line, flush=True)

    def skipped(self, step: int, values: dict[str, float]) -> None:
        """An optimizer update skipped for gradient overflow: always logged, never a step."""
        if not self.main:
            return
        self.record("skip", step, values)
        scale = f", loss scale now {values['loss_scale']:g}" if "loss_scale" in values else ""
        self.info(f"step {step + 1}/{self.total}: update skipped (gradient overflow{scale}); "
                  f"{values['skipped_steps']} skipped in all, not counted as steps")

    def close(self) -> None:
        if not self.main:
            return
        self._end_bar()
        self.sinks.close()


# ================================================================================ the run


def _vec(*scalars: Any) -> Any:
    import torch

    return torch.stack([s.double() for s in scalars])


def _fetch(batches: Any, n: int) -> tuple[list[dict[str, Any]], str | None]:
    """The next `n` micro-batches, or the data error met on the way (a damaged sample, a shard
    that cannot be read): returned, not raised, so that the ranks can agree on it first."""
    try:
        return [next(batches) for _ in range(n)], None
    except UserError as e:
        return [], str(e)


def train(plan: Plan) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from bertscale import optim, perf
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import MaskingConfig, PretrainLoader, verify_shards
    from bertscale.model import BertForPreTraining, pretraining_loss
    from bertscale.parallelize import FastPaths, apply_fast_paths

    recipe, env, run_dir = plan.recipe, plan.env, plan.run_dir
    t, G, W = recipe.train, recipe.train.global_batch_size, plan.env.world_size

    # ---- process group, signals
    distributed.init(env)
    distributed.install_signal_handlers()
    # ---- one writer per run folder: a second live trainer stops here, on every rank (exit 2)
    run_lock = runlock.acquire(run_dir, env.is_main)

    # ---- the shards are the manifest's: sizes and sample counts (tar headers only), and with
    # data.verify_sha256 the hashes; each rank checks its share (the corpus is read once per job,
    # not once per rank), and every rank stops with the same message if one is bad
    problems = distributed.gather_problems(
        [msg for split in ("train", "eval")
         for msg in verify_shards(plan.manifest, split, env.rank, W, sha256=recipe.data.verify_sha256)])
    if problems:
        more = f" (and {len(problems) - 1} more bad shards)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    if env.is_main:
        ckpt_lib.copy_atomic(Path(plan.manifest.vocab_file), run_dir / ckpt_lib.VOCAB_FILE)
        ckpt_lib.write_json_atomic(run_dir / "recipe.json", recipe_to_dict(recipe))
        ckpt_lib.write_json_atomic(run_dir / "deepspeed_config.json", plan.ds_config)

    # ---- model (same initial weights on every rank), optimizer, schedule, engine; then the
    # committed checkpoint this run continues, if any (bertscale.resume: the one resume path)
    seed_all(t.seed)
    fast = recipe.fast
    perf.set_tf32(fast.tf32)
    model = BertForPreTraining(plan.model_config)
    apply_fast_paths(model, FastPaths(
        unpad=fast.unpad, checkpoint_activations=fast.checkpoint_activations, compile=fast.compile))
    if plan.init_from is not None:
        from bertscale.model import load_pretrained
        weights = ckpt_lib.load_consolidated(plan.init_from.path)
        load_pretrained(model, weights.state_dict, source=f"train.init_from {plan.init_from.path}")
        del weights
    ckpt_lib.mark_universal(model)
    optimizer = optim.build_optimizer(recipe.optimizer, model)

    def build_engine(ds_config: dict[str, Any]) -> tuple[Any, Any]:
        engine, _, _, scheduler = deepspeed.initialize(
            # The device is local_rank modulo the visible GPUs, not DeepSpeed's LOCAL_RANK as is.
            args=argparse.Namespace(device_rank=distributed.local_device_index(env)),
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: optim.build_scheduler(opt, recipe.schedule, t.steps))
        optim.make_zero_aware(optimizer, engine)  # LAMB: trust ratios per original tensor under ZeRO
        return engine, scheduler

    (engine, scheduler), start = resume_lib.restore(plan.resume_from, plan.ds_config, build_engine,
                                                    rank=env.rank, world_size=W, seed=t.seed)
    overflow = steps_lib.OverflowInjector(model,
                                          recipe.debug.overflow_at_steps if env.is_main else [])
    device = engine.device
    step = start.step
    last_saved = step if start.resumed_from is not None else None

    skips = steps_lib.Skips()
    if plan.resume_from is not None:
        skips.total = int(plan.resume_from.state.get("skipped_steps", 0))

    # ---- data: the loader owns the global position (consumed_samples)
    masking = MaskingConfig(mask_prob=recipe.data.mask_prob,
                            max_predictions_per_seq=recipe.data.max_predictions_per_seq,
                            whole_word=recipe.data.whole_word_masking)
    loader = PretrainLoader(plan.manifest, split="train", global_batch_size=G,
                            micro_batch_size=t.micro_batch_size, rank=env.rank, world_size=W,
                            seed=t.seed, consumed_samples=start.consumed_samples, masking=masking,
                            num_workers=recipe.data.num_workers,
                            bad_sample_policy=recipe.data.bad_sample_policy,
                            max_bad_samples=recipe.data.max_bad_samples,
                            verify_sha256=False,  # checked above, a share per rank
                            fetch=FetchSettings.of(recipe.data))
    batches = iter(loader)

    reporter = Reporter(plan, step)
    peak = perf.mfu_peak(recipe.logging.peak_tflops, device, plan.precision)  # (TFLOP/s, source)
    n_params = sum(p.numel() for p in model.parameters())
    if start.resumed_from is not None:
        how = (f", converted from {start.saved_world_size} ranks through a universal checkpoint"
               if start.universal else "")
        reporter.info(f"resumed from {start.resumed_from.path} (step {step}, "
                      f"{start.consumed_samples} samples consumed{how})")
    elif plan.init_from is not None:
        reporter.info(f"initialised from {plan.init_from.path} (step {plan.init_from.step} weights)")
    reporter.info(f"pretraining {recipe.name}: {n_params / 1e6:.1f}M parameters, {W} rank(s), "
                  f"ZeRO-{plan.zero_stage} {plan.precision}, global batch {G} = {t.micro_batch_size} "
                  f"x {plan.grad_accum} accumulation x {W}, seq {plan.manifest.seq_len}, "
                  f"steps {step}->{t.steps}, run folder {run_dir}")
    reporter.info(f"MFU against {peak[0]:g} TFLOP/s per device ({peak[1]}, {plan.precision}); model "
                  f"FLOPs on real tokens (bertscale.perf)" if peak else
                  "MFU not reported: set logging.peak_tflops (no datasheet peak for this device)")

    def agree_on_data(error: str | None) -> None:
        """A data error met by one rank stops every rank at the same point with the same line
        (the first rank's), instead of the others waiting in the next collective."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag)
        if flag.item():
            found = distributed.gather_problems([error] if error else [])
            raise UserError(f"step {step + 1}: {found[0]}")

    def state_for_checkpoint() -> dict[str, Any]:
        return {"step": step, "consumed_samples": loader.consumed_samples,
                "skipped_steps": skips.total,
                "recipe": recipe_to_dict(recipe),
                "model_config": to_dict(plan.model_config), "tokenizer_hash": plan.tokenizer_hash,
                "manifest_fingerprint": plan.manifest.fingerprint,
                "manifest_path": str(plan.manifest.path), "lowercase": bool(plan.manifest.lowercase),
                "seq_len": plan.manifest.seq_len, "pair_objective": plan.manifest.pair_objective,
                "zero_stage": plan.zero_stage, "precision": plan.precision,
                "global_batch_size": G, "micro_batch_size": t.micro_batch_size,
                "deepspeed_config": plan.ds_config_path.name}

    def params_finite() -> bool:
        # ZeRO-3 keeps only this rank's partition in ds_tensor; the others hold full copies.
        ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in model.parameters())
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        return flag.item() == 0

    def save_checkpoint() -> int | None:
        nonlocal last_saved
        if last_saved == step:
            return None
        if not params_finite():
            reporter.info(f"error: step {step}: weights are not finite; not saving a checkpoint")
            return distributed.NONFINITE_EXIT_CODE
        ckpt_lib.save(engine, run_dir, step, state_for_checkpoint(), keep=recipe.checkpoint.keep,
                      check_free_space=recipe.checkpoint.check_free_space, log=reporter.info)
        last_saved = step
        return None

    def evaluate() -> dict[str, float]:
        micro = recipe.eval.micro_batch_size or t.micro_batch_size
        # One pass over the first eval.samples of the eval split in stored order (the same
        # samples on any number of ranks), padded with void samples so every rank has the same
        # number of batches; masks depend on (seed, position) only, so every eval sees the same
        # masks.
        eval_loader = PretrainLoader(plan.manifest, split="eval", global_batch_size=micro * W,
                                     micro_batch_size=micro, rank=env.rank, world_size=W, seed=t.seed,
                                     masking=masking, verify_sha256=False,
                                     max_samples=recipe.eval.samples,
                                     fetch=FetchSettings.of(recipe.data))
        sums = torch.zeros(8, dtype=torch.float64, device=device)
        engine.eval()
        try:
            eval_batches = iter(eval_loader)
            with torch.no_grad():
                for _ in range(len(eval_loader)):
                    fetched, error = _fetch(eval_batches, 1)
                    agree_on_data(error)
                    batch = {k: v.to(device, non_blocking=True) for k, v in fetched[0].items()}
                    out = engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                 attention_mask=batch["attention_mask"],
                                 masked_positions=batch["masked_positions"])
                    p = pretraining_loss(out, batch["masked_labels"], batch["next_sentence_label"],
                                         vocab_size=plan.manifest.vocab_size)
                    # Sums, not means: a token-weighted MLM loss and exact counts after the all-reduce.
                    sums += _vec(p.mlm * p.mlm_count, p.nsp * p.nsp_count, p.mlm_correct, p.mlm_count,
                                 p.nsp_correct, p.nsp_count, (batch["sample_ids"] >= 0).sum(),
                                 (batch["next_sentence_label"] == 1).sum())
        finally:
            engine.train()
            eval_loader.close()
        dist.all_reduce(sums)
        mlm_loss, nsp_loss, mlm_ok, mlm_n, nsp_ok, nsp_n, n, nsp_pos = sums.tolist()
        values = {"mlm_loss": mlm_loss / max(mlm_n, 1), "mlm_acc": mlm_ok / max(mlm_n, 1),
                  "masked_tokens": mlm_n, "samples": n}
        if nsp_n:
            # The accuracy of always answering the commoner label: NSP's real floor, not 50%.
            values.update(nsp_loss=nsp_loss / nsp_n, nsp_acc=nsp_ok / nsp_n, pairs=nsp_n,
                          nsp_majority=max(nsp_pos, nsp_n - nsp_pos) / nsp_n)
        values["loss"] = values["mlm_loss"] + values.get("nsp_loss", 0.0)
        return values

    def report_eval(values: dict[str, float]) -> None:
        reporter.record("eval", step, values)
        nsp = f"  nsp_acc {values['nsp_acc']:.3f}" if "nsp_acc" in values else ""
        reporter.info(f"eval step {step}: loss {values['loss']:.4f}  mlm_acc {values['mlm_acc']:.3f}"
                      f"{nsp}  ({int(values['samples'])} samples)")

    # ---- the step loop
    exit_code = 0
    stop_at = min(t.steps, plan.stop_at_step) if plan.stop_at_step else t.steps
    try:
        if recipe.eval.at_start and step == 0:
            report_eval(evaluate())
        engine.train()
        while step < stop_at:
            t0 = time.perf_counter()
            micro_batches, data_error = _fetch(batches, plan.grad_accum)
            agree_on_data(data_error)
            # loss, mlm loss, nsp loss, mlm hits, mlm count, nsp hits, nsp count, real tokens,
            # squared real lengths (the FLOP count's attention term), non-finite micro-batches,
            # preemption flag: one all-reduce per optimizer step.
            stats = torch.zeros(11, dtype=torch.float64, device=device)
            seen: list[tuple[Any, Any]] = []  # (finite?, sample_ids) per micro-batch, no sync
            overflow.arm(step + 1)
            for micro, cpu_batch in enumerate(micro_batches):
                batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                out = engine(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                             attention_mask=batch["attention_mask"],
                             masked_positions=batch["masked_positions"])
                parts = pretraining_loss(out, batch["masked_labels"], batch["next_sentence_label"],
                                         vocab_size=plan.manifest.vocab_size)
                loss = parts.total
                if recipe.debug.nan_loss_at_step == step + 1 and env.is_main:
                    loss = loss * float("nan")  # fault injection (tests): the NaN path end to end
                finite = torch.isfinite(loss.detach())
                seen.append((finite, batch["sample_ids"]))
                engine.backward(loss)
                if micro < plan.grad_accum - 1:
                    engine.step()  # inside the accumulation window: DeepSpeed only counts it
                stats += _vec(
                    torch.where(finite, loss.detach(), 0.0), torch.where(finite, parts.mlm.detach(), 0.0),
                    torch.where(finite, parts.nsp.detach(), 0.0), parts.mlm_correct, parts.mlm_count,
                    parts.nsp_correct, parts.nsp_count,
                    *perf.batch_length_sums(batch["attention_mask"]),
                    ~finite, torch.zeros((), device=device))
            stats[10] = 1.0 if distributed.local_preemption_flag() else 0.0
            dist.all_reduce(stats)
            (loss_s, mlm_s, nsp_s, mlm_ok, mlm_n, nsp_ok, nsp_n, tokens, tokens_sq, nonfinite,
             preempt) = stats.tolist()
            if nonfinite:
                # Stop BEFORE the optimizer step: the weights stay those of step `step`.
                bad_ids = [i for ok, ids in seen if not bool(ok) for i in ids.tolist()]
                if bad_ids:
                    print(f"[rank {env.rank}] step {step + 1}: non-finite loss; batch sample_ids "
                          f"{bad_ids}", file=sys.stderr, flush=True)
                latest = ckpt_lib.latest_committed(run_dir)
                reporter.info(f"error: step {step + 1}: loss is NaN/inf in {int(nonfinite)} "
                              f"micro-batch(es) (sample ids on stderr of the rank(s) that saw it); "
                              f"stopping without saving. Newest committed checkpoint: "
                              f"{latest.path if latest else 'none'}")
                exit_code = distributed.NONFINITE_EXIT_CODE
                break

            lr = float(scheduler.get_last_lr()[0])  # the rate this step's update uses
            collapsed = False
            try:
                engine.step()  # optimizer step (clipping, ZeRO update), LR schedule step
            except Exception as e:
                # fp16: DeepSpeed's dynamic loss scaler raises (on every rank: overflow is
                # all-reduced) when an overflow happens at its minimum scale.
                if "loss scale already at minimum" not in str(e):
                    raise
                collapsed = True
            # A skipped update (gradient overflow) is not a step; its samples were consumed.
            applied = not collapsed and engine.was_step_applied()
            skips.record(applied)
            scale = steps_lib.loss_scale(engine) if plan.precision == "fp16" else None
            if collapsed or skips.in_a_row >= t.max_loss_scale_skips:
                reporter.info(f"error: step {step + 1}: {skips.in_a_row} optimizer updates in a row "
                              f"skipped for gradient overflow (loss scale {scale}); stopping "
                              f"without saving")
                exit_code = distributed.NONFINITE_EXIT_CODE
                break
            if not applied:
                # A preemption flag stays set: the next applied step saves and exits.
                reporter.skipped(step, {"skipped_steps": skips.total,
                                        "consumed_samples": loader.consumed_samples,
                                        "loss": loss_s / (W * plan.grad_accum),
                                        **({"loss_scale": scale} if scale is not None else {})})
                continue
            step += 1
            dt = time.perf_counter() - t0
            n = W * plan.grad_accum
            model_flops = perf.step_flops_from_sums(plan.model_config, G, int(tokens),
                                                    int(tokens_sq), int(mlm_n), nsp=nsp_n > 0).train
            tflops = model_flops / dt / 1e12
            values = {"loss": loss_s / n, "mlm_loss": mlm_s / n, "mlm_acc": mlm_ok / max(mlm_n, 1),
                      "lr": lr, "samples_per_s": G / dt,
                      "tokens_per_s": tokens / dt, "model_flops": model_flops, "tflops": tflops,
                      "step_time_s": dt,
                      "consumed_samples": loader.consumed_samples, "skipped_steps": skips.total}
            if nsp_n:
                values.update(nsp_loss=nsp_s / n, nsp_acc=nsp_ok / nsp_n)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            if peak is not None:
                values["mfu"] = tflops / (peak[0] * W)
            values.update(perf.peak_memory_gib(device))
            last = step == t.steps
            reporter.train_step(step, values, log_now=step % recipe.logging.every == 0 or last or step == 1)

            if recipe.eval.every and step % recipe.eval.every == 0 or last:
                report_eval(evaluate())
            due = recipe.checkpoint.every and step % recipe.checkpoint.every == 0
            if due or preempt or (last and recipe.checkpoint.at_end) or step == stop_at:
                failed = save_checkpoint()
                if failed:
                    exit_code = failed
                    break
            if preempt and step < t.steps:
                names = ",".join(distributed.signal_names()) or "a signal on another rank"
                reporter.info(f"preempted ({names}): checkpoint step {step} committed; exiting "
                              f"with code {distributed.PREEMPTED_EXIT_CODE} to be requeued")
                exit_code = distributed.PREEMPTED_EXIT_CODE
                run_lock.record_preemption(step, distributed.signal_names())  # for requeue wrappers
                break
        else:
            if step < t.steps:
                reporter.info(f"stopped at step {step} as asked (--stop-at-step); resume to continue")
            else:
                reporter.info(f"done: {step} steps, {loader.consumed_samples} samples; checkpoints in "
                              f"{ckpt_lib.checkpoints_dir(run_dir)}, metrics in {run_dir / 'metrics.jsonl'}")
    finally:
        reporter.close()
        loader.close()
    distributed.barrier()
    run_lock.release()
    distributed.shutdown()
    return exit_code


# ================================================================================ the CLI


def run(recipe: PretrainRecipe, *, run_dir: str | Path | None = None, resume: str = "auto",
        stop_at_step: int | None = None) -> int:
    """Validate, then train. The Python entry point behind `bertscale pretrain`."""
    env = distributed.discover()
    distributed.require_usable_gpus()
    run_dir = Path(run_dir or recipe.run_dir or Path("runs") / recipe.name)
    plan = build_plan(recipe, env, run_dir, resume, stop_at_step)
    try:
        return train(plan)
    finally:
        distributed.shutdown()  # also when an error that every rank agreed on ends the run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain BERT (MLM + NSP) with DeepSpeed ZeRO",
        description="Pretrain BERT from prepared shards. Launch one process per device with "
                    "torchrun, deepspeed, mpirun or srun; a single process needs no launcher.")
    p.add_argument("recipe", nargs="?",
                   help="recipe TOML file, or a built-in recipe name (e.g. tiny_ci; --list "
                        "shows them)")
    p.add_argument("--list", action="store_true",
                   help="list the built-in recipes and model presets, and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (after --set) and the DeepSpeed JSON it "
                        "gives at this world size as one JSON object, and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a recipe field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run folder (default: recipe run_dir or runs/<name>)")
    p.add_argument("--resume", choices=("auto", "require", "never"), default="auto",
                   help="auto: continue from the newest committed checkpoint if there is one")
    p.add_argument("--stop-at-step", type=int, help="save and stop after this step (exit 0)")
    p.add_argument("--no-wandb", action="store_true", help="disable Weights & Biases")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device, for MFU")
    p.add_argument("--verbose", action="store_true",
                   help="keep DeepSpeed's own INFO logging and every third-party warning")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.list:
        print(_builtin_listing())
        return 0
    if args.recipe is None:
        raise ConfigError("give a recipe (a TOML file or a built-in name); "
                          "`bertscale pretrain --list` shows the built-in ones")
    overrides = list(args.overrides)
    if args.no_wandb:
        overrides.append("logging.wandb=false")
    if args.tensorboard:
        overrides.append("logging.tensorboard=true")
    if args.peak_tflops is not None:
        overrides.append(f"logging.peak_tflops={args.peak_tflops}")
    recipe = load_pretrain_recipe(args.recipe, overrides)
    if args.stop_at_step is not None and args.stop_at_step <= 0:
        raise ConfigError(f"--stop-at-step must be positive, got {args.stop_at_step}")
    if args.print_config:
        print(_resolved_config(recipe))
        return 0
    quiet_deepspeed(args.verbose)
    return run(recipe, run_dir=args.run_dir, resume=args.resume, stop_at_step=args.stop_at_step)


def _builtin_listing() -> str:
    """`pretrain --list`: each built-in recipe with the first line of its comment, then the
    model presets with their shapes."""
    from bertscale.config import PRESETS, builtin_recipe, preset
    folder = builtin_recipe("tiny_ci").parent
    lines = ["built-in recipes (bertscale pretrain NAME; files in bertscale/recipes/):"]
    for path in sorted(folder.glob("*.toml")):
        first = next((ln.lstrip("# ").rstrip() for ln in path.read_text().splitlines()
                      if ln.startswith("#") and ln.strip("# ")), "")
        lines.append(f"  {path.stem:<20} {first}")
    lines.append("model presets (model.preset = NAME):")
    for name in PRESETS:
        c = preset(name)
        lines.append(f"  {name:<20} L={c.num_hidden_layers} H={c.hidden_size} "
                     f"A={c.num_attention_heads} intermediate={c.intermediate_size}")
    return "\n".join(lines)


def _resolved_config(recipe: PretrainRecipe) -> str:
    """`pretrain --print-config`: the recipe as the run would use it and its DeepSpeed JSON
    (batch fields injected for the world size a launcher gives, 1 alone)."""
    import torch
    world = distributed.discover().world_size
    ds, path, _, _, _ = deepspeed_config(recipe, world, torch.cuda.is_available())
    return json.dumps({"recipe": recipe_to_dict(recipe), "world_size": world,
                       "deepspeed_config_file": str(path), "deepspeed": ds}, indent=2, default=str)


def quiet_deepspeed(verbose: bool = False) -> None:
    """DeepSpeed logs every setting at INFO on every rank; keep warnings only unless asked."""
    import logging

    from bertscale.reporting import quiet_third_party
    quiet_third_party(verbose)
    if not verbose:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*")
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*")


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.pretrain ...`: the same command, without importing the other subcommands."""
    from bertscale.commands import run_subcommand
    return run_subcommand("pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
