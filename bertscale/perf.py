"""Performance arithmetic: the FLOPs of a BERT training step, a measured matmul peak, and the
micro-batch finder.

FLOPs are *model* FLOPs, the useful work of the step, counted the same way for every
implementation so that throughput and MFU compare: per layer the dense projections
(Q, K, V, output: 4 H^2 multiply-adds per token) and the FFN (2 H I), bidirectional attention
over each sequence's real length L (Q K^T and attention x V: 2 L^2 H multiply-adds), the MLM
head (transform H^2 and decoder H V) only at the predicted (labelled) positions, and the pooler
and NSP classifier once per sequence when the batch has NSP labels (with the MLM-only objective
the model still runs the pooler, but it is not counted). V is the model's vocabulary rows, the
padded count under `fast.pad_vocab_multiple` (the decoder computes those rows). A multiply-add
is 2 FLOPs; a training step is 3x the forward (the backward computes gradients for inputs and
weights: 2x), whatever the step really runs: the recomputation of activation checkpointing is
not counted, nor are padding, the decoder at unmasked positions, embedding lookups, softmax,
LayerNorm and the optimizer: an implementation that computes them does so at its own cost. This
is the model-FLOPs convention of the MFU figures in the PaLM paper (Chowdhery et al. 2022,
appendix B: rematerialisation excluded), with attention and dense work over real tokens instead
of the padded length.

Limits: the peak is what one large matmul reaches on this device and dtype right now (a shared
CPU gives a lower, noisier figure than its datasheet); the micro-batch finder learns only from
out-of-memory errors, so on a CPU (where running out of memory kills the process) give it a
memory budget instead.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bertscale.config import ModelConfig
from bertscale.errors import UserError

__all__ = ["StepFlops", "step_flops", "step_flops_from_sums", "batch_length_sums",
           "datasheet_peak", "measure_matmul_peak", "is_out_of_memory",
           "MicroBatchPlan", "find_max_micro_batch", "plan_accumulation", "find_micro_batch"]


# ----------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one batch by part; `train` is the whole step (3x forward)."""

    dense: int        # Q, K, V, attention output and FFN projections, all layers
    attention: int    # Q K^T and probabilities x V over each sequence's real length
    mlm_head: int     # transform + decoder at the predicted positions
    pooler_nsp: int   # pooler + NSP classifier, once per sequence

    @property
    def forward(self) -> int:
        return self.dense + self.attention + self.mlm_head + self.pooler_nsp

    @property
    def train(self) -> int:
        return 3 * self.forward


def step_flops(cfg: ModelConfig, lengths: Sequence[int], num_predictions: int,
               nsp: bool = True) -> StepFlops:
    """Model FLOPs of one batch whose sequences have these real `lengths`, with
    `num_predictions` masked tokens in all (labels != -100), with or without the NSP head."""
    return step_flops_from_sums(cfg, len(lengths), sum(int(n) for n in lengths),
                                sum(int(n) * int(n) for n in lengths), num_predictions, nsp)


def step_flops_from_sums(cfg: ModelConfig, sequences: int, tokens: int, tokens_squared: int,
                         num_predictions: int, nsp: bool = True) -> StepFlops:
    """`step_flops` from what a trainer can all-reduce cheaply: the number of sequences, the sum
    of their real lengths and the sum of the squared lengths (attention is quadratic per
    sequence). The one FLOP count behind the trainer's log, `bertscale bench` and the GPU check."""
    # The paper's names (I: the intermediate size).
    H, I, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size)  # noqa: E741
    dense = 2 * L * int(tokens) * (4 * H * H + 2 * H * I)
    attention = 2 * L * 2 * H * int(tokens_squared)
    mlm = 2 * int(num_predictions) * (H * H + H * V)
    pooler_nsp = 2 * int(sequences) * (H * H + 2 * H) if nsp else 0
    return StepFlops(dense, attention, mlm, pooler_nsp)


def batch_length_sums(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of real lengths, sum of squared real lengths) of a (B, T) attention mask, as 0-dim
    tensors on its device (no host sync)."""
    lengths = attention_mask.sum(dim=1, dtype=torch.int64)   # (B,)
    return lengths.sum(), (lengths * lengths).sum()


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, in TFLOP/s per GPU, matched
# against torch.cuda.get_device_name() (first match wins: the more specific names first).
# "fp32" is TF32 tensor-core math; plain fp32 CUDA-core peaks are far lower (H100 SXM: 67).
_DATASHEET: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("H200", "NVIDIA H200 (SXM) datasheet", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", "NVIDIA H100 PCIe datasheet", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", "NVIDIA H100 NVL datasheet", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", "NVIDIA H100 SXM datasheet", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", "NVIDIA A100 datasheet", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)


def datasheet_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(TFLOP/s, source) of one device in "bf16" | "fp16" | "fp32" (TF32) from NVIDIA's
    datasheet, or None for a device not in the table (then pass `logging.peak_tflops`)."""
    for key, source, peaks in _DATASHEET:
        if key.lower() in device_name.lower() and precision in peaks:
            return peaks[precision], source
    return None


def mfu_peak(given_tflops: float, device: str | torch.device,
             precision: str) -> tuple[float, str] | None:
    """The per-device peak MFU is reported against: `given_tflops` when positive (a recipe's
    `logging.peak_tflops`), else the datasheet's for this CUDA device, else None (no MFU)."""
    if given_tflops > 0:
        return given_tflops, "logging.peak_tflops"
    device = torch.device(device)
    if device.type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(device), precision)
    return None


def peak_memory_gib(device: str | torch.device) -> dict[str, float]:
    """The run's peak memory so far: {"max_memory_gib": ...} allocated by torch on a CUDA device,
    or {"max_rss_gib": ...} of this process on the CPU (Linux reports ru_maxrss in KiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions on CUDA (process-wide torch
    flags; they do nothing on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


# ------------------------------------------------------------------------------------ peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul on `device` in `dtype` (median of `repeats` timed runs after
    one warm-up). Default n: 8192 on CUDA, 2048 for fp32 on the CPU, 512 for CPU bf16/fp16
    (emulated on CPUs without native support, about 100x slower)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else (2048 if dtype == torch.float32 else 512)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    inner = 10 if device.type == "cuda" else 1  # amortise launch and timer overhead on GPUs
    torch.mm(a, b)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / statistics.median(times)


# ------------------------------------------------------------------------ micro-batch finder


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator's RuntimeError saying it ran out of memory."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@dataclass
class MicroBatchPlan:
    """The largest micro-batch that fitted and what keeps the global batch."""

    max_fits: int
    """Largest micro-batch that ran without running out of memory."""
    micro_batch: int
    """Largest micro-batch <= max_fits that divides global_batch / world_size."""
    grad_accum: int
    """global_batch / (micro_batch * world_size)."""
    tried: list[tuple[int, bool]] = field(default_factory=list)
    """Every size tried, in order, and whether it fitted."""


def find_max_micro_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 4096,
                         tried: list[tuple[int, bool]] | None = None) -> int:
    """Largest m in [1, limit] with fits(m) True, assuming fitting is monotone: doublings from
    `start` until one fails (or `limit`), then bisection between the last fit and the first
    failure. Returns 0 when even the smallest size tried (1 after halving down) fails."""
    tried = [] if tried is None else tried

    def check(m: int) -> bool:
        ok = fits(m)
        tried.append((m, ok))
        return ok

    start = max(1, min(start, limit))
    if check(start):
        good, bad = start, None
        while bad is None and good < limit:
            m = min(good * 2, limit)
            if check(m):
                good = m
            else:
                bad = m
        if bad is None:
            return good
    else:
        good, bad = 0, start
    while bad - good > 1:  # invariant: good fits (or is 0), bad does not
        m = (good + bad) // 2
        if check(m):
            good = m
        else:
            bad = m
    return good


def plan_accumulation(global_batch: int, world_size: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch, grad_accum): the largest micro-batch <= max_micro with
    micro * world_size * accum == global_batch."""
    if global_batch <= 0 or world_size <= 0:
        raise UserError(f"global batch {global_batch} and world size {world_size} must be positive")
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} is not divisible by {world_size} ranks")
    per_rank = global_batch // world_size
    if max_micro < 1:
        raise UserError("not even a micro-batch of 1 fits in memory at this sequence length; "
                        "enable activation checkpointing or use a smaller model")
    micro = max(d for d in range(1, min(per_rank, max_micro) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def find_micro_batch(try_step: Callable[[int], None], global_batch: int, world_size: int = 1,
                     start: int = 1, limit: int | None = None,
                     device: str | torch.device | None = None) -> MicroBatchPlan:
    """Run `try_step(m)` (one forward + backward at micro-batch m, at the sequence length that
    matters) for growing m; an out-of-memory error means "does not fit", any other error is
    raised. Memory is released between tries. `limit` defaults to the per-rank batch."""
    per_rank = global_batch // max(world_size, 1)
    limit = per_rank if limit is None else limit
    dev = torch.device(device) if device is not None else None

    def fits(m: int) -> bool:
        try:
            try_step(m)
            return True
        except Exception as e:  # only out-of-memory is an answer; re-raise others
            if not is_out_of_memory(e):
                raise
        # Out of memory: drop what the failed step left (its frames are gone once we are out of
        # the except block) before the next, smaller try.
        gc.collect()
        if dev is not None and dev.type == "cuda":
            torch.cuda.empty_cache()
        return False

    tried: list[tuple[int, bool]] = []
    best = find_max_micro_batch(fits, start=start, limit=max(limit, 1), tried=tried)
    micro, accum = plan_accumulation(global_batch, world_size, best)
    return MicroBatchPlan(best, micro, accum, tried)
