"""`bertscale bench model` and `bench microbatch`: a pretraining step side by side with the
reference, and the largest micro-batch that fits.

`model` times one training step (forward, backward, optimizer step, zero_grad) of bertscale's
`BertForPreTraining` and of Hugging Face `transformers`' `BertForPreTraining` built from the same
config with the same weights (copied through `bertscale.hf`'s key map), on the same batches, with
the same optimizer (`bertscale.optim.build_optimizer`, same implementation for both), threads
and precision. After warm-up the two alternate step by step (A B, then B A, ...) so that drifting
machine load hits both alike; each reports the median over the repeats. Throughput counts real
(non-padding) tokens; TFLOP/s and MFU use `bertscale.perf.step_flops` (model FLOPs, identical for
both) against a matmul peak measured in the same process on the same device and dtype.

Precision: fp32, or bf16 autocast over fp32 weights and optimizer state for both models (torch's
mixed-precision recipe; DeepSpeed's bf16 keeps bf16 weights with an fp32 master copy, which moves
less memory; the matmuls are the same bf16 ones).

Batches: random token ids at full length, or with `--lengths-from` real ones: a prepared
manifest.json (the training batches the loader yields, masking included) or a lengths file
(JSON: {"<seq_len>": [lengths...]}, e.g. benchmarks/wiki_lengths.json) from which lengths are
drawn, with random ids.

`transformers` is a test-only dependency, imported only here and only when present; without it
the bench runs bertscale alone and says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertscale.config import ModelConfig, preset
from bertscale.errors import UserError
from bertscale.perf import MicroBatchPlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor          # (B, T)
    token_type_ids: torch.Tensor     # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    masked_positions: torch.Tensor   # (B, P)
    masked_labels: torch.Tensor      # (B, P), -100 padded
    next_sentence_label: torch.Tensor  # (B,)
    labels_dense: torch.Tensor | None = None  # (B, T), for transformers; made outside the timing

    def to(self, device: torch.device) -> Batch:
        b = Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                    if f.name != "labels_dense"))
        b.labels_dense = b.dense_labels()
        return b

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()

    @property
    def num_predictions(self) -> int:
        return int((self.masked_labels != -100).sum())

    def dense_labels(self) -> torch.Tensor:
        """(B, T) labels for a dense MLM loss (transformers' `labels`)."""
        out = torch.full_like(self.input_ids, -100)
        valid = self.masked_labels != -100
        rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(valid)
        out[rows[valid], self.masked_positions[valid]] = self.masked_labels[valid]
        return out


def default_predictions(seq_len: int) -> int:
    """max_predictions_per_seq of Google's recipe: 20 at 128, 80 at 512 (15% rounded up)."""
    return 20 if seq_len <= 128 else max(20, math.ceil(0.15 * seq_len / 16) * 16)


def synthetic_batch(cfg: ModelConfig, batch: int, seq_len: int, lengths: list[int] | None,
                    predictions: int, generator: torch.Generator) -> Batch:
    """Random ids; sequences of the given real lengths (default: full), [CLS] A [SEP] B [SEP]
    segments, `predictions` masked positions per sequence (15% of the real tokens at most)."""
    lengths = lengths or [seq_len] * batch
    V = cfg.vocab_size
    ids = torch.randint(5, V, (batch, seq_len), generator=generator)
    am = torch.zeros(batch, seq_len, dtype=torch.long)
    tt = torch.zeros(batch, seq_len, dtype=torch.long)
    pos = torch.zeros(batch, predictions, dtype=torch.long)
    labels = torch.full((batch, predictions), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, :n] = 1
        ids[b, n:] = 0
        tt[b, n // 2:n] = 1
        k = min(predictions, max(1, round(0.15 * n)), max(n - 2, 0))
        if k:
            p = torch.randperm(n - 2, generator=generator)[:k].sort().values + 1
            pos[b, :k] = p
            labels[b, :k] = ids[b, p]
    nsp = torch.randint(0, 2, (batch,), generator=generator)
    return Batch(ids, tt, am, pos, labels, nsp)


def read_lengths(path: Path, seq_len: int) -> list[int]:
    """Sequence lengths for `seq_len` from a JSON file: {"<seq_len>": [length, ...]} or a
    histogram {"<seq_len>": {"<length>": count, ...}}."""
    try:
        data = json.loads(path.read_text())[str(seq_len)]
        if isinstance(data, dict):
            lengths = [int(n) for n, count in data.items() for _ in range(int(count))]
        else:
            lengths = [int(n) for n in data]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: cannot read lengths for seq len {seq_len} "
                        f"({type(e).__name__}: {e})") from None
    if not lengths or not all(2 <= n <= seq_len for n in lengths):
        raise UserError(f"{path}: lengths for seq len {seq_len} must be in [2, {seq_len}]")
    return lengths


def make_batches(cfg: ModelConfig, batch: int, seq_len: int, count: int, seed: int,
                 lengths_from: Path | None) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    P = default_predictions(seq_len)
    if lengths_from is None:
        return [synthetic_batch(cfg, batch, seq_len, None, P, g) for _ in range(count)]
    if lengths_from.suffix == ".json" and lengths_from.name != "manifest.json":
        pool = read_lengths(lengths_from, seq_len)
        return [synthetic_batch(cfg, batch, seq_len,
                                [pool[int(i)] for i in torch.randint(len(pool), (batch,),
                                                                     generator=g)], P, g)
                for _ in range(count)]
    from bertscale.data.loader import LoaderConfig, MaskingConfig, open_loader
    from bertscale.data.shards import read_manifest

    manifest = read_manifest(lengths_from)
    if manifest.seq_len != seq_len:
        raise UserError(f"{lengths_from}: prepared at seq len {manifest.seq_len}, but "
                        f"--seq-len is {seq_len}")
    loader = open_loader(manifest, LoaderConfig(
        split="train", global_batch_size=batch, micro_batch_size=batch, seed=seed,
        masking=MaskingConfig(max_predictions_per_seq=P)))
    out = []
    for b, _ in zip(loader, range(count)):
        out.append(Batch(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                         b["masked_positions"], b["masked_labels"], b["next_sentence_label"]))
    loader.close()
    if cfg.vocab_size < int(max(int(b.input_ids.max()) for b in out)) + 1:
        raise UserError(f"{lengths_from}: token ids exceed the model's vocab_size "
                        f"{cfg.vocab_size}")
    return out


# ------------------------------------------------------------------------------- models


def import_transformers() -> Any | None:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        return None


def build_models(cfg: ModelConfig, fast: Any, device: torch.device, with_hf: bool,
                 seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    from bertscale.hf import config_to_hf, to_hf_keys
    from bertscale.model import BertForPreTraining
    from bertscale.parallelize import apply_fast_paths
    from bertscale.seeding import seed_all

    seed_all(seed)
    with device:  # initialise on the device itself: BERT-Large's init is slow on a host CPU
        ours = BertForPreTraining(cfg)
    apply_fast_paths(ours, fast)
    hf_model = None
    if with_hf:
        transformers = import_transformers()
        assert transformers is not None, "with_hf only when transformers imports"
        hf_cfg = transformers.BertConfig(**config_to_hf(cfg))
        hf_cfg._attn_implementation = "sdpa"  # PyTorch's fused attention, as ours
        with device:
            hf_model = transformers.BertForPreTraining(hf_cfg)
        sd = to_hf_keys(ours.state_dict(), cfg, "BertForPreTraining", "bench")
        missing, unexpected = hf_model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in ("cls.predictions.decoder.weight",
                                                   "cls.predictions.decoder.bias")]
        if missing or unexpected:
            raise RuntimeError(f"weights do not map onto transformers: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        hf_model.tie_weights()
        hf_model.to(device).train()
    ours.to(device).train()
    return ours, hf_model


def make_step(model: torch.nn.Module, kind: str, optimizer: torch.optim.Optimizer,
              device: torch.device, dtype: torch.dtype) -> Callable[[Batch], torch.Tensor]:
    from bertscale.model import pretraining_loss

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(b: Batch) -> torch.Tensor:
        with autocast:
            if kind == "bertscale":
                out = model(b.input_ids, b.token_type_ids, b.attention_mask,
                            masked_positions=b.masked_positions)
                loss = pretraining_loss(out, b.masked_labels, b.next_sentence_label).total
            else:
                loss = model(input_ids=b.input_ids, token_type_ids=b.token_type_ids,
                             attention_mask=b.attention_mask, labels=b.labels_dense,
                             next_sentence_label=b.next_sentence_label).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- the bench


@dataclass
class ModelBenchConfig:
    """One `bertscale bench model` run."""

    preset: str = "base"
    seq_len: int = 128
    batch: int = 8
    """Sequences per step (micro-batch)."""
    dtype: str = "fp32"
    """fp32, or bf16 autocast over fp32 weights (both models alike)."""
    device: str = "cpu"
    repeats: int = 5
    """Timed repeats per implementation."""
    warmup: int = 1
    """Untimed repeats first."""
    steps: int = 1
    """Training steps per timed repeat."""
    num_batches: int = 4
    """Distinct batches the steps cycle through."""
    lengths_from: Path | None = None
    """Real lengths: a prepared manifest.json or a lengths JSON ({"<seq_len>": [...]})."""
    unpad: bool = False
    checkpoint_activations: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    optimizer: str = "adamw"
    optimizer_impl: str | None = None
    """foreach, fused or loop; default fused for adamw, foreach for lamb (both models alike)."""
    threads: int | None = None
    seed: int = 0
    no_transformers: bool = False
    """Time bertscale alone."""
    peak_n: int | None = None
    """Size of the square matmul that measures the peak (default: by device)."""

    def validate(self) -> None:
        if self.seq_len < 8 or self.batch < 1 or self.repeats < 1 or self.steps < 1:
            raise UserError("--seq-len must be >= 8; --batch, --repeats and --steps >= 1")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose {' or '.join(DTYPES)}")


Timing = tuple[float, float, float, float]
"""(wall seconds, process CPU seconds, model FLOPs, real tokens) per step of one repeat."""


@dataclass
class _Setup:
    """What the timed repeats run: each implementation's step, the batches, their FLOPs."""

    model_config: ModelConfig
    fast: Any
    ours: torch.nn.Module
    runs: dict[str, Callable[[Batch], Any]]
    batches: list[Batch]
    flops_of: dict[int, int]
    initial_loss: dict[str, float]
    with_hf: bool
    note: str
    impl: str


def bench_model(args: ModelBenchConfig) -> dict[str, Any]:
    """Time one training step of bertscale and transformers alike (module docstring); the
    results as a JSON-ready dict."""
    from bertscale.perf import measure_matmul_peak

    args.validate()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = _set_up(args, device, dtype)
    timer = _Timer(args, setup, device)
    load_before = os.getloadavg()
    timer.warm_up()
    peak = measure_matmul_peak(device, dtype, n=args.peak_n)
    samples = timer.repeats()
    load_after = os.getloadavg()
    # The best of two peak measurements: a busy machine only ever lowers it.
    peak = max(peak, measure_matmul_peak(device, dtype, n=args.peak_n))
    return _summary(args, setup, samples, peak, device, dtype, (load_before, load_after))


def _set_up(args: ModelBenchConfig, device: torch.device, dtype: torch.dtype) -> _Setup:
    from bertscale.optim import OptimizerConfig, build_optimizer
    from bertscale.parallelize import FastPaths
    from bertscale.perf import step_flops

    cfg = preset(args.preset, max_position_embeddings=max(512, args.seq_len))
    with_hf = not args.no_transformers
    hf_note = ""
    if with_hf and import_transformers() is None:
        with_hf = False
        hf_note = "transformers is not installed: timing bertscale alone"
        print(f"bench: {hf_note}", file=sys.stderr)
    fast = FastPaths(unpad=args.unpad, checkpoint_activations=args.checkpoint_activations,
                     compile=args.compile, compile_backend=args.compile_backend)
    ours, hf_model = build_models(cfg, fast, device, with_hf, seed=args.seed)
    # torch has fused AdamW kernels on CPU and CUDA; LAMB (ours) is foreach.
    impl = args.optimizer_impl or ("fused" if args.optimizer == "adamw" else "foreach")
    opt_cfg = OptimizerConfig(name=args.optimizer, lr=1e-4, implementation=impl)  # type: ignore[arg-type]
    batches = [b.to(device) for b in make_batches(cfg, args.batch, args.seq_len,
                                                  args.num_batches, args.seed,
                                                  args.lengths_from)]
    runs: dict[str, Callable[[Batch], Any]] = {
        "bertscale": make_step(ours, "bertscale", build_optimizer(opt_cfg, ours), device, dtype)}
    if hf_model is not None:
        runs["transformers"] = make_step(hf_model, "transformers",
                                         build_optimizer(opt_cfg, hf_model), device, dtype)
    flops_of = {id(b): step_flops(cfg, b.lengths, b.num_predictions).train for b in batches}
    initial_loss = {name: _eval_loss(model, name, batches[0], device, dtype)
                    for name, model in (("bertscale", ours), ("transformers", hf_model))
                    if model is not None}
    return _Setup(cfg, fast, ours, runs, batches, flops_of, initial_loss, with_hf, hf_note, impl)


class _Timer:
    """Times the implementations' steps: a warm-up, then repeats in which they alternate (A B,
    then B A, ...) so that drifting machine load hits both alike."""

    def __init__(self, args: ModelBenchConfig, setup: _Setup, device: torch.device):
        self.args, self.setup, self.device = args, setup, device
        self.names = list(setup.runs)

    def timed(self, name: str, i: int) -> Timing:
        args, batches = self.args, self.setup.batches
        chosen = [batches[(i * args.steps + k) % len(batches)] for k in range(args.steps)]
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for b in chosen:
            self.setup.runs[name](b)
        _sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        work = sum(self.setup.flops_of[id(b)] for b in chosen)
        tokens = sum(sum(b.lengths) for b in chosen)
        return wall / args.steps, cpu / args.steps, work / args.steps, tokens / args.steps

    def warm_up(self) -> None:
        """Allocator, kernels, compilation."""
        for name in self.names:
            for i in range(self.args.warmup):
                self.timed(name, i)

    def repeats(self) -> dict[str, list[Timing]]:
        samples: dict[str, list[Timing]] = {n: [] for n in self.names}
        for r in range(self.args.repeats):
            order = self.names if r % 2 == 0 else self.names[::-1]
            for name in order:
                samples[name].append(self.timed(name, r))
        return samples


def _summary(args: ModelBenchConfig, setup: _Setup, samples: dict[str, list[Timing]],
             peak: float, device: torch.device, dtype: torch.dtype,
             load: tuple[tuple[float, float, float], tuple[float, float, float]]
             ) -> dict[str, Any]:
    """Medians, throughput, TFLOP/s and MFU per implementation, and the speed-ups."""
    from bertscale.parallelize import compile_failure
    from bertscale.perf import datasheet_peak

    sheet = datasheet_peak(device_name(device), "fp32" if dtype == torch.float32 else "bf16")
    flops = statistics.fmean(setup.flops_of.values())
    tokens = statistics.fmean(sum(b.lengths) for b in setup.batches)
    results: dict[str, Any] = {}
    for name, timings in samples.items():
        walls = [w for w, *_ in timings]
        t = statistics.median(walls)
        achieved = statistics.median(f / w for w, _, f, _ in timings)
        results[name] = dict(step_s=t, times_s=walls,
                             cpu_s=statistics.median(c for _, c, _, _ in timings),
                             seq_per_s=args.batch / t,
                             tokens_per_s=statistics.median(n / w for w, _, _, n in timings),
                             tflops=achieved / 1e12, mfu=achieved / peak,
                             mfu_datasheet=achieved / (sheet[0] * 1e12) if sheet else None)
    if len(samples) == 2:
        results["speedup"] = results["transformers"]["step_s"] / results["bertscale"]["step_s"]
        # Each repeat ran the two back to back on the same batch: the median of those paired
        # ratios is the estimate least moved by load that drifts from one repeat to the next.
        results["speedup_paired"] = statistics.median(
            h[0] / b[0] for b, h in zip(samples["bertscale"], samples["transformers"]))
        if device.type == "cpu":
            results["speedup_cpu_time"] = (results["transformers"]["cpu_s"]
                                           / results["bertscale"]["cpu_s"])
    transformers = import_transformers() if setup.with_hf else None
    # What ran, not what was asked: a compile that fell back to eager is not reported compiled.
    fast_paths = dataclasses.asdict(setup.fast)
    fast_paths.pop("compile_backend", None)
    compile_error = compile_failure(setup.ours)
    if compile_error:
        fast_paths["compile"] = False
    return dict(
        argv=sys.argv[1:],
        date=time.strftime("%Y-%m-%d"),
        device=device_name(device), threads=torch.get_num_threads(),
        load_avg_before=load[0], load_avg_after=load[1],
        torch=torch.__version__, transformers=getattr(transformers, "__version__", None),
        note=setup.note or None,
        preset=args.preset, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype,
        precision=("fp32" if dtype == torch.float32 else "bf16 autocast, fp32 weights and "
                   "optimizer state"),
        optimizer=f"{args.optimizer} ({setup.impl})", fast_paths=fast_paths,
        compile_error=compile_error,
        compile_backend=setup.fast.compile_backend if setup.fast.compile else None,
        lengths_from=str(args.lengths_from) if args.lengths_from else None,
        mean_real_tokens=tokens, fill=tokens / (args.batch * args.seq_len),
        flops_per_step=flops, peak_tflops=peak / 1e12, peak_source="measured matmul",
        datasheet_tflops=sheet[0] if sheet else None, datasheet_source=sheet[1] if sheet else None,
        warmup=args.warmup, repeats=args.repeats, steps_per_repeat=args.steps,
        initial_loss=setup.initial_loss, results=results)


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, kind: str, b: Batch, device: torch.device,
               dtype: torch.dtype) -> float:
    """Loss in eval mode (no dropout): equal for both when weights and batch are the same."""
    from bertscale.model import pretraining_loss

    model.eval()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if kind == "bertscale":
                out = model(b.input_ids, b.token_type_ids, b.attention_mask,
                            masked_positions=b.masked_positions)
                return pretraining_loss(out, b.masked_labels, b.next_sentence_label).total.item()
            return model(input_ids=b.input_ids, token_type_ids=b.token_type_ids,
                         attention_mask=b.attention_mask, labels=b.labels_dense,
                         next_sentence_label=b.next_sentence_label).loss.item()
    finally:
        model.train()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def format_table(r: dict[str, Any]) -> str:
    on = [k for k, v in r["fast_paths"].items()
          if v is True or (k == "varlen_attention" and r["fast_paths"]["unpad"])]
    head = (f"{r['preset']} seq {r['seq_len']} batch {r['batch']} {r['dtype']} on {r['device']}, "
            f"{r['threads']} threads, fill {r['fill']:.0%}, fast paths "
            f"{', '.join(on) or 'none'}"
            f", optimizer {r['optimizer']}, peak {r['peak_tflops']:.3f} TFLOP/s (measured matmul)"
            + (f", {r['datasheet_tflops']:g} ({r['datasheet_source']})"
               if r.get("datasheet_tflops") else ""))
    lines = [head, f"{'':14}{'step s':>10}{'seq/s':>10}{'tokens/s':>11}{'TFLOP/s':>10}"
                   f"{'MFU':>8}"]
    for name in ("bertscale", "transformers"):
        if name in r["results"]:
            x = r["results"][name]
            lines.append(f"{name:14}{x['step_s']:>10.3f}{x['seq_per_s']:>10.1f}"
                         f"{x['tokens_per_s']:>11.0f}{x['tflops']:>10.3f}{x['mfu']:>8.1%}")
    if "speedup" in r["results"]:
        cpu = r["results"].get("speedup_cpu_time")
        lines.append(f"bertscale / transformers: {r['results']['speedup']:.2f}x wall "
                     f"({r['results']['speedup_paired']:.2f}x median of paired repeats)"
                     + (f", {cpu:.2f}x process CPU time" if cpu else "")
                     + f" (medians of {r['repeats']} alternating repeats; load average "
                     f"{r['load_avg_before'][0]:.1f} -> {r['load_avg_after'][0]:.1f})")
    if r.get("compile_error"):
        lines.append(f"torch.compile FAILED, bertscale ran eager: {r['compile_error']}")
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- micro-batch


@dataclass
class MicroBatchBenchConfig:
    """One `bertscale bench microbatch` run (CUDA)."""

    global_batch: int
    preset: str = "large"
    seq_len: int = 512
    world_size: int = 1
    start: int = 8
    """The first micro-batch tried."""
    dtype: str = "bf16"
    device: str = "cuda"
    unpad: bool = False
    checkpoint_activations: bool = False


def bench_microbatch(args: MicroBatchBenchConfig) -> MicroBatchPlan:
    """The largest micro-batch of real training steps that fits the device, and the gradient
    accumulation that keeps the global batch; printed and returned."""
    from bertscale.model import BertForPreTraining, pretraining_loss
    from bertscale.parallelize import FastPaths, apply_fast_paths
    from bertscale.perf import find_micro_batch

    device = torch.device(args.device)
    if device.type != "cuda":
        # Running out of host memory kills the process instead of raising: nothing to learn.
        raise UserError("bench microbatch needs --device cuda (on a CPU an out-of-memory kills "
                        "the process; use bertscale.perf.find_max_micro_batch with a budget)")
    dtype = DTYPES[args.dtype]
    cfg = preset(args.preset)
    model = BertForPreTraining(cfg)
    apply_fast_paths(model, FastPaths(unpad=args.unpad,
                                      checkpoint_activations=args.checkpoint_activations))
    model.to(device).train()
    # The optimizer state takes its memory before the first step: allocate it up front.
    from bertscale.optim import OptimizerConfig, build_optimizer
    opt = build_optimizer(OptimizerConfig(implementation="fused"), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)

    def try_step(m: int) -> None:
        b = synthetic_batch(cfg, m, args.seq_len, None, default_predictions(args.seq_len),
                            g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(b.input_ids, b.token_type_ids, b.attention_mask,
                        masked_positions=b.masked_positions)
            loss = pretraining_loss(out, b.masked_labels, b.next_sentence_label).total
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    plan = find_micro_batch(try_step, args.global_batch, args.world_size, start=args.start,
                            device=device)
    print(f"{args.preset} seq {args.seq_len} {args.dtype} on {device_name(device)}: largest "
          f"micro-batch that fits {plan.max_fits} (tried {plan.tried}); for global batch "
          f"{args.global_batch} on {args.world_size} ranks: micro-batch {plan.micro_batch} x "
          f"gradient accumulation {plan.grad_accum}")
    return plan
