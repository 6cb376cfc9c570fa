"""Optimizers and learning-rate schedules: AdamW, LAMB that stays right under DeepSpeed ZeRO.

- `param_groups` splits a model into a decayed group (weight matrices, embeddings) and an
  undecayed one (biases and LayerNorm parameters), as Google's BERT and every BERT record do.
- AdamW is torch's own (`foreach` or `fused` kernels, or the plain loop). Note that torch's Adam
  bias-corrects its moments; Google's `AdamWeightDecayOptimizer` did not.
- `Lamb` is LAMB as You et al. 2019 define it and NVIDIA's / DeepSpeed's BERT records use it:
  Adam moments with bias correction, update u = m_hat / (sqrt(v_hat) + eps) + wd * w, trust ratio
  phi = ||w|| / ||u|| per parameter tensor (1 when either norm is 0), w -= lr * phi * u. The math
  runs on `torch._foreach_*` ops (one Python loop over groups, none over tensors);
  `implementation="loop"` is the per-tensor reference the parity test compares against. State is
  `step` / `exp_avg` / `exp_avg_sq` per parameter, the names Adam uses, so DeepSpeed's checkpoint
  code (and its universal-checkpoint converter) treats it as it treats Adam's.
- Under ZeRO, DeepSpeed hands the optimizer one flat fp32 partition per group and rank, which cuts
  through parameter tensors. A plain LAMB would compute one trust ratio per partition. After
  `deepspeed.initialize`, `make_zero_aware(optimizer, engine)` reads the partition layout from the
  engine; each step then sums ||w||^2 and ||u||^2 per original tensor over the local segments,
  all-reduces the per-tensor sums over the data-parallel group (one all-reduce per group), and
  applies each tensor's trust ratio to its segments.

Limits, stated honestly:
- `make_zero_aware` knows DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`), its bf16
  ZeRO-1 optimizer (`BF16_Optimizer`) and ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`). Without ZeRO
  the client optimizer sees the original tensors and plain LAMB is already right. NVMe offload of
  optimizer state is refused (its buffers are swapped in and out of the partitions we key on).
- The trust ratio applies to every tensor, LayerNorm and biases included, as in the paper and
  NVIDIA's NVLAMB; there is no clamp (DeepSpeed's CUDA FusedLamb clamps it to [0.01, 10]).
- Gradient pre-normalisation (`max_grad_norm`, as NVIDIA's FusedLAMB) needs the global gradient
  norm over all groups; under ZeRO DeepSpeed calls `step()` once per group, so it is refused
  there: set DeepSpeed's `"gradient_clipping"`, which is the same operation done by the engine.
- The learning-rate warmup follows Google's BERT: step s < warmup gets lr * s / warmup, so the
  very first update has lr 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bertscale.config import OptimizerConfig, ScheduleConfig, warmup_steps
from bertscale.errors import ConfigError, UserError

# The configs are torch-free and live with the other recipe sections (reading a recipe imports no
# torch); they are re-exported here beside what they build.
__all__ = [
    "OptimizerConfig", "ScheduleConfig", "param_groups", "build_optimizer", "Lamb",
    "make_zero_aware", "build_scheduler", "warmup_steps",
]


# ------------------------------------------------------------------------- param groups

# Module names that mean "a LayerNorm" in the checkpoints we load (HF BERT: "LayerNorm").
_NORM_NAMES = {"LayerNorm", "layernorm", "layer_norm", "ln"}


def _no_decay(module: nn.Module, module_name: str, param_name: str) -> bool:
    if param_name == "bias":
        return True
    last = module_name.rpartition(".")[2]
    return isinstance(module, nn.LayerNorm) or last in _NORM_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: every trainable parameter with weight decay `weight_decay`, except
    biases and LayerNorm parameters, which get 0. Tied parameters appear once (first name wins).
    Empty groups are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():   # de-duplicates tied parameters
        if not param.requires_grad:
            continue
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        (no_decay if _no_decay(module, module_name, param_name) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or Lamb over `param_groups(model, cfg.weight_decay)`. For Lamb under ZeRO, call
    `make_zero_aware(optimizer, engine)` after `deepspeed.initialize`."""
    cfg.validate()
    groups = param_groups(model, cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay,
                                 foreach=cfg.implementation == "foreach",
                                 fused=True if cfg.implementation == "fused" else None)
    impl = cfg.implementation
    if impl == "fused":  # OptimizerConfig.validate says so first, naming the field
        raise ConfigError("optimizer.implementation = 'fused' exists only for adamw")
    return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                implementation=impl)


# --------------------------------------------------------------------------------- LAMB


@dataclass
class _FlatLayout:
    """How one flat ZeRO partition on this rank maps onto its group's original tensors."""

    numel: int
    """Length of the flat partition (checked at every step)."""
    run_sizes: list[int]
    """The partition cut into consecutive runs that cover it exactly."""
    run_tensor: list[int]
    """Index (within the group, the same on every rank) of the tensor each run belongs to;
    -1 for alignment padding, which no tensor owns."""
    numels: list[int]
    """Full size of each tensor of the group (the same on every rank); its length is the
    length of the all-reduced per-tensor vectors."""
    process_group: Any
    """The data-parallel group the partitions of this group are spread over."""

    def __post_init__(self) -> None:
        self.pieces = [k for k, t in enumerate(self.run_tensor) if t >= 0]
        self._index: dict[torch.device, Tensor] = {}

    def piece_tensor_index(self, device: torch.device) -> Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor([self.run_tensor[k] for k in self.pieces],
                                               dtype=torch.int64, device=device)
        return self._index[device]

    def pieces_of(self, flat: Tensor) -> list[Tensor]:
        # Views are rebuilt every step: DeepSpeed may move a partition (`.data = ...`) between
        # steps, and cached views would then point at the old storage.
        runs = torch.split(flat.view(-1), self.run_sizes)
        return [runs[k] for k in self.pieces]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) with Adam's bias-corrected moments and decoupled weight decay.

    Per parameter tensor w with gradient g, at step t:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w
        phi = ||w|| / ||u||  (1 when either norm is 0);  w = w - lr * phi * u
    `max_grad_norm` (off by default) first scales every gradient by
    max_grad_norm / max(||g_all||, max_grad_norm), NVIDIA FusedLAMB's pre-normalisation.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, max_grad_norm: float | None = None,
                 implementation: Literal["foreach", "loop"] = "foreach") -> None:
        if implementation not in ("foreach", "loop"):
            raise ConfigError(f"Lamb implementation {implementation!r} is not allowed; choose "
                              f"'foreach' or 'loop'")
        if not lr > 0 or not eps > 0 or not weight_decay >= 0:
            raise ConfigError(f"Lamb needs lr > 0, eps > 0, weight_decay >= 0; got lr={lr}, "
                              f"eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"Lamb betas must be in [0, 1), got {betas}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"Lamb max_grad_norm must be positive or None, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, implementation=implementation)
        super().__init__(params, defaults)
        # id(flat partition) -> (the partition, its layout); empty = plain LAMB on real tensors.
        self._zero_layouts: dict[int, tuple[Tensor, _FlatLayout]] = {}

    # -- step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._prenorm_scale()
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # `step` is a CPU float tensor, as in torch's Adam, so the bias corrections
                    # are computed on the host without a device sync.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if params:
                self._step_group(group, params, grads, states, grad_scale)
        return loss

    def _prenorm_scale(self) -> Tensor | None:
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return None
        if self._zero_layouts:
            raise UserError("Lamb max_grad_norm cannot be used under ZeRO (DeepSpeed steps one "
                            "group at a time); set DeepSpeed's \"gradient_clipping\" instead")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return max_norm / total.clamp(min=max_norm)

    def _step_group(self, group: dict, params: list[Tensor], grads: list[Tensor],
                    states: list[dict], grad_scale: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        foreach = group["implementation"] == "foreach"
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]

        # 1. Adam moments and the bias-corrected update u (before the trust ratio).
        if foreach:
            torch._foreach_add_(steps, 1.0)
            if grad_scale is not None:
                grads = list(torch._foreach_mul(grads, grad_scale.to(grads[0].device)))
            bc1 = [1.0 - beta1 ** s.item() for s in steps]
            bc2 = [1.0 - beta2 ** s.item() for s in steps]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_div(exp_avg_sqs, bc2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            updates = list(torch._foreach_div(exp_avgs, bc1))
            torch._foreach_div_(updates, denom)
            del denom
            if wd != 0:
                torch._foreach_add_(updates, params, alpha=wd)
        else:
            updates = []
            for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                s.add_(1.0)
                if grad_scale is not None:
                    g = g * grad_scale.to(g.device)
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                u = (m / (1.0 - beta1 ** s.item())) / (
                    (v / (1.0 - beta2 ** s.item())).sqrt_().add_(eps))
                if wd != 0:
                    u.add_(p, alpha=wd)
                updates.append(u)

        # 2. The tensors the trust ratio is about: the parameters themselves, or, under ZeRO,
        #    the pieces of the flat partition that belong to each original tensor.
        layout = self._layout_for(params)
        if layout is None:
            p_pieces, u_pieces = params, updates
        else:
            p_pieces, u_pieces = layout.pieces_of(params[0]), layout.pieces_of(updates[0])
        if not p_pieces:
            # Under ZeRO a rank's partition can be all padding; it still joins the all-reduce.
            norms = params[0].new_zeros(2, 0)
        elif foreach:
            norms = torch.stack([torch.stack(torch._foreach_norm(p_pieces)),
                                 torch.stack(torch._foreach_norm(u_pieces))])   # (2, pieces)
        else:
            norms = torch.stack([torch.stack([torch.linalg.vector_norm(x) for x in p_pieces]),
                                 torch.stack([torch.linalg.vector_norm(x) for x in u_pieces])])

        if layout is not None:
            # Sum squared norms per original tensor, locally and then over all ranks.
            index = layout.piece_tensor_index(norms.device)
            sums = norms.new_zeros(2, len(layout.numels)).index_add_(1, index, norms.square())
            sums = _all_reduce_sum(sums, layout.process_group)
            tensor_norms = sums.sqrt()
            ratios = _trust_ratio(tensor_norms[0], tensor_norms[1])[index]
        else:
            ratios = _trust_ratio(norms[0], norms[1])

        # 3. w -= lr * phi * u
        if not p_pieces:
            return
        if foreach:
            torch._foreach_mul_(u_pieces, list(ratios.unbind(0)))
            torch._foreach_add_(p_pieces, u_pieces, alpha=-lr)
        else:
            for w, u, r in zip(p_pieces, u_pieces, ratios.unbind(0)):
                w.add_(u * r, alpha=-lr)

    def _layout_for(self, params: list[Tensor]) -> _FlatLayout | None:
        if not self._zero_layouts:
            return None
        entry = self._zero_layouts.get(id(params[0])) if len(params) == 1 else None
        if entry is None or entry[0] is not params[0]:
            raise RuntimeError(
                "Lamb was made ZeRO-aware but is stepping a tensor that is not one of the "
                "partitions it was told about (did DeepSpeed rebuild its partitions? call "
                "make_zero_aware again after that)")
        flat, layout = entry
        if flat.numel() != layout.numel:
            raise RuntimeError(f"ZeRO partition has {flat.numel()} elements, layout expects "
                               f"{layout.numel}")
        return layout


def _all_reduce_sum(t: Tensor, pg: Any) -> Tensor:
    """Sum `t` over the group. NCCL takes only accelerator tensors, but a partition can live on
    the CPU (ZeRO-Offload): such a tensor travels through the current accelerator."""
    device = _comm_device(t.device, pg)
    if device == t.device:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
        return t
    on_device = t.to(device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=pg)
    return on_device.to(t.device)


def _comm_device(device: torch.device, pg: Any) -> torch.device:
    if device.type != "cpu":
        return device
    # e.g. "gloo", "nccl", "cpu:gloo,cuda:nccl"
    names = set(str(dist.get_backend(pg)).lower().replace(":", ",").split(","))
    if names & {"gloo", "mpi", "ccl"}:
        return device
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None:
        return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def _trust_ratio(w_norm: Tensor, u_norm: Tensor) -> Tensor:
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, w_norm / torch.where(ok, u_norm, 1.0), 1.0)


# ------------------------------------------------------------------------- ZeRO layout


def make_zero_aware(optimizer: torch.optim.Optimizer, engine: Any) -> None:
    """Tell a `Lamb` how DeepSpeed partitioned its parameters, so its trust ratios are per
    original tensor with norms summed across the data-parallel ranks.

    Call it on every rank right after `deepspeed.initialize` (it runs one all-reduce per group
    to check that the ranks' partitions together cover every tensor exactly once). Any other
    optimizer is element-wise and needs nothing: the call returns without doing anything.
    Without ZeRO the Lamb keeps working on the original tensors.
    """
    if not isinstance(optimizer, Lamb):
        return
    wrapper = getattr(engine, "optimizer", None)
    if wrapper is None:
        raise UserError("make_zero_aware: the engine has no optimizer; pass the Lamb to "
                        "deepspeed.initialize(optimizer=...) first")
    kind = type(wrapper).__name__
    if wrapper is optimizer or kind == "FP16_UnfusedOptimizer":
        # No ZeRO (fp32, or fp16 / bf16 through the unfused wrapper, which keeps one fp32 copy
        # per original tensor): plain LAMB is already per tensor.
        optimizer._zero_layouts = {}
        return
    if getattr(wrapper, "optimizer", None) is not optimizer:
        raise UserError(f"make_zero_aware: the engine's optimizer ({kind}) does not wrap this "
                        f"Lamb; pass the same object to deepspeed.initialize(optimizer=...)")
    if optimizer.defaults["max_grad_norm"] is not None:
        raise UserError("Lamb max_grad_norm cannot be used under ZeRO (DeepSpeed steps one "
                        "group at a time); set DeepSpeed's \"gradient_clipping\" instead")

    if kind == "DeepSpeedZeroOptimizer":               # ZeRO-1 / ZeRO-2
        flats = list(wrapper.single_partition_of_fp32_groups)
        layouts = [_layout_from_hp_mapping(lp, flat, pg)
                   for lp, flat, pg in zip(wrapper.bit16_groups, flats,
                                           wrapper.real_dp_process_group)]
    elif kind == "BF16_Optimizer":                     # bf16 ZeRO-1 with fp32 grad accumulation
        flats = list(wrapper.fp32_groups_flat_partition)
        layouts = [_layout_from_hp_mapping(lp, flat, pg)
                   for lp, flat, pg in zip(wrapper.bf16_groups, flats,
                                           wrapper.real_dp_process_group)]
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(wrapper, "swap_optimizer", False):
            raise UserError("make_zero_aware: ZeRO-3 with NVMe offload of optimizer state is not "
                            "supported with Lamb; use offload to cpu or none")
        flats = list(wrapper.fp32_partitioned_groups_flat)
        groups = (getattr(wrapper, "sub_group_process_groups", None)
                  or [wrapper.dp_process_group] * len(flats))   # older DeepSpeed: one group
        layouts = [_layout_stage3(params, flat, pg)
                   for params, flat, pg in zip(wrapper.fp16_groups, flats, groups)]
    else:
        # e.g. FP16_Optimizer, which flattens each group without telling us the layout.
        raise UserError(f"make_zero_aware: DeepSpeed optimizer wrapper {kind} is not supported "
                        f"with Lamb (known: DeepSpeedZeroOptimizer, BF16_Optimizer, "
                        f"DeepSpeedZeroOptimizer_Stage3, FP16_UnfusedOptimizer)")
    optimizer._zero_layouts = {id(flat): (flat, layout) for flat, layout in zip(flats, layouts)}


def _layout_from_hp_mapping(lp_params: list[Tensor], flat: Tensor, pg: Any) -> _FlatLayout:
    # DeepSpeed links each original (low-precision) parameter to its fragment of this rank's
    # fp32 partition (`_hp_mapping`); universal checkpoints are written from the same links.
    fragments = []
    for index, lp in enumerate(lp_params):
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is not None:
            addr = mapping.get_hp_fragment_address()
            fragments.append((int(addr.start), int(addr.numel), index))
    return _build_layout(fragments, flat, [lp.numel() for lp in lp_params], pg)


def _layout_stage3(params: list[Tensor], flat: Tensor, pg: Any) -> _FlatLayout:
    # ZeRO-3 partitions every parameter on its own: rank r holds elements
    # [r * n, (r + 1) * n) of each flattened parameter (n = partition_numel, the last rank's
    # slice padded), and the sub-group's fp32 partition concatenates those slices.
    rank = dist.get_rank(group=pg)
    fragments, offset = [], 0
    zero3 = [cast(_Zero3Param, p) for p in params]
    for index, p in enumerate(zero3):
        n = int(p.partition_numel())
        valid = max(0, min(n, int(p.ds_numel) - rank * n))
        if valid:
            fragments.append((offset, valid, index))
        offset += n
    return _build_layout(fragments, flat, [int(p.ds_numel) for p in zero3], pg)


class _Zero3Param(Protocol):
    """What ZeRO-3 adds to a parameter it partitions."""

    ds_numel: int

    def partition_numel(self) -> int: ...


def _build_layout(fragments: list[tuple[int, int, int]], flat: Tensor, numels: list[int],
                  pg: Any) -> _FlatLayout:
    total = flat.numel()
    run_sizes, run_tensor, pos = [], [], 0
    for start, numel, index in sorted(fragments):
        if start < pos or start + numel > total:
            raise RuntimeError(f"ZeRO layout: fragment of tensor {index} at [{start}, "
                               f"{start + numel}) overlaps or leaves the partition of {total}")
        if start > pos:
            run_sizes.append(start - pos)
            run_tensor.append(-1)
        run_sizes.append(numel)
        run_tensor.append(index)
        pos = start + numel
    if pos < total:
        run_sizes.append(total - pos)
        run_tensor.append(-1)
    # Every element of every tensor must be owned by exactly one rank.
    covered = torch.zeros(len(numels), dtype=torch.float64)
    for _start, numel, index in fragments:
        covered[index] += numel
    covered = _all_reduce_sum(covered, pg)
    expected = torch.tensor(numels, dtype=torch.float64)
    if not torch.equal(covered, expected):
        bad = int((covered != expected).nonzero()[0])
        raise RuntimeError(f"ZeRO layout: tensor {bad} of a group has {int(covered[bad])} "
                           f"elements across ranks' partitions, expected {numels[bad]}")
    return _FlatLayout(numel=total, run_sizes=run_sizes, run_tensor=run_tensor,
                       numels=list(numels), process_group=pg)


# ---------------------------------------------------------------------------- schedules


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplying each group's peak lr by
        s / W                                   for s < W (linear warmup from 0),
        r + (1 - r) * (1 - (s - W) / (T - W))^p for W <= s <= T ("linear": p = 1), then r,
    or 1 after warmup for "constant"; s = scheduler steps taken, W warmup, T total_steps,
    r = min_lr_ratio. The factor is a closure, so the scheduler's state_dict holds only the
    step counter: a resumed run uses its recipe's schedule."""
    cfg.validate()
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
    warm = warmup_steps(cfg, total_steps)
    if warm > total_steps:
        raise ConfigError(f"schedule.warmup = {cfg.warmup} steps is longer than the run "
                          f"({total_steps} steps)")
    decay, power, floor = cfg.decay, float(cfg.power), float(cfg.min_lr_ratio)

    def factor(step: int) -> float:
        if step < warm:
            return step / warm
        if decay == "constant":
            return 1.0
        if total_steps == warm:
            return floor
        progress = min(1.0, (step - warm) / (total_steps - warm))
        return floor + (1.0 - floor) * (1.0 - progress) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recipe_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters as the recipe built them (everything but the tensors
    and the current lr); `follow_recipe_after_load` puts them back after a checkpoint load."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")}
            for g in optimizer.param_groups]


def follow_recipe_after_load(scheduler: torch.optim.lr_scheduler.LambdaLR,
                             recipe_groups: list[dict[str, Any]]) -> list[float]:
    """After a checkpoint load, run the recipe's schedule and hyperparameters from the next step.

    A load restores the saved param groups (their lr is the one the OLD schedule gave at the
    saved step: 0 at the end of a linearly decayed run), the scheduler's base lrs and its step
    counter. The counter is the run's; everything else must be today's recipe, or a resume that
    extends `train.steps` takes its first step at the old schedule's last rate (lr 0) and one
    that changes a hyperparameter keeps the old value in silence. Returns each group's lr for
    the next update: base lr x the recipe's factor at the restored step."""
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(recipe_groups):
        raise UserError(f"the checkpoint holds {len(groups)} optimizer param groups, the recipe "
                        f"builds {len(recipe_groups)}; the model or optimizer setup changed")
    for group, recipe in zip(groups, recipe_groups):
        group.update(recipe)
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    lrs = [float(base) * factor(scheduler.last_epoch)
           for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports (the reporter's lr)
    return lrs
