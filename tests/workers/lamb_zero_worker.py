"""One rank of the LAMB-under-ZeRO test (tests/test_lamb_zero.py), started by tests/launch.py.

One process group runs several configurations one after the other, each from the same initial
weights and the same data (global batch GLOBAL_BATCH, rank r takes rows [r*B/W, (r+1)*B/W)):

  zero0_aware   DeepSpeed without ZeRO, make_zero_aware called (must be a no-op)
  zero1_aware   ZeRO-1, Lamb made ZeRO-aware
  zero2_aware   ZeRO-2, Lamb made ZeRO-aware; saves a checkpoint after SAVE_AT steps
  zero2_resume  ZeRO-2, a fresh engine (other initial weights) loads that checkpoint, compares
                the Lamb state with a snapshot taken at the save, and trains to STEPS
  zero3_aware   ZeRO-3, Lamb made ZeRO-aware
  zero2_naive   ZeRO-2, Lamb NOT made ZeRO-aware (one trust ratio per flat partition)
  bf16_zero1_*  bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer),
                aware and naive; the fp32 master weights are compared

Finally it checks that a Lamb with gradient pre-normalisation is refused under ZeRO.
Rank 0 writes the full parameters after STEPS steps of each configuration, the layout facts
(whether partition boundaries cut through tensors) and the checkpoint comparison to
OUT/results.pt. The 1-rank reference is computed by the test itself with `build_model` /
`batches` from this file and a plain Lamb.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bertscale.errors import UserError
from bertscale.optim import Lamb, make_zero_aware, param_groups

GLOBAL_BATCH = 8
STEPS = 5
SAVE_AT = 3
LR = 0.05
WEIGHT_DECAY = 0.01
IN, HID, MID, OUT = 13, 37, 19, 3   # odd sizes so that ZeRO's partition boundaries cut tensors


class TinyNet(nn.Module):
    """Linear + LayerNorm layers named as in Hugging Face BERT ("dense", "LayerNorm")."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(IN, HID)
        self.LayerNorm = nn.LayerNorm(HID)
        self.inner = nn.Linear(HID, MID)
        self.head = nn.Linear(MID, OUT)
        # A one-element tensor in a group of its own: on rank 1 that group's partition is all
        # padding, yet the rank must still join the group's all-reduce.
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.LayerNorm(self.dense(x)))        # (B, HID)
        return self.head(torch.tanh(self.inner(h))) * self.gain   # (B, OUT)


def build_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():   # LayerNorm starts at 1/0; perturb it so its trust ratio matters
        model.LayerNorm.weight.add_(0.1 * torch.randn(HID))
        model.LayerNorm.bias.add_(0.1 * torch.randn(HID))
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g))
            for _ in range(STEPS)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def make_lamb(model: nn.Module, **kwargs) -> Lamb:
    groups = param_groups(model, WEIGHT_DECAY)
    for g in groups:
        g["params"] = [p for p in g["params"] if p is not model.gain]
    groups.append({"params": [model.gain], "weight_decay": 0.0})
    return Lamb(groups, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)


def ds_config(stage: int, world: int, bf16: bool = False) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small (the default keeps small ones whole).
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            # DeepSpeed 0.19 clips at 1.0 unless told otherwise; compare the optimizer alone.
            "gradient_clipping": 0.0,
            # bf16 with fp32 gradient accumulation under ZeRO-1 is DeepSpeed's BF16_Optimizer.
            **({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
            "wall_clock_breakdown": False}


def split_facts(opt: Lamb) -> list[tuple[int, int]]:
    """Per flat partition: (tensors this rank holds only part of, tensors it holds any of)."""
    facts = []
    for _flat, layout in opt._zero_layouts.values():
        covered: dict[int, int] = {}
        for size, t in zip(layout.run_sizes, layout.run_tensor):
            if t >= 0:
                covered[t] = covered.get(t, 0) + size
        facts.append((sum(1 for t, n in covered.items() if n < layout.numels[t]), len(covered)))
    return facts


def full_params(engine, model: nn.Module, stage: int, bf16: bool) -> dict[str, torch.Tensor]:
    """The full fp32 parameters (collective: every rank calls it, after a step)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    if bf16:    # the fp32 master weights, not their bf16 copies in the model
        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.named_parameters()}
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lamb_state(opt: Lamb) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[flat].items()} for flat, _ in opt._zero_layouts.values()]


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    out = Path(sys.argv[1])
    t0 = time.time()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    t_init = time.time() - t0
    data = batches()
    per = GLOBAL_BATCH // world
    local = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in data]
    results: dict = {"params": {}, "split_tensors": {}, "seconds": {"init_distributed": t_init}}
    ckpt_dir = out / "ckpt"

    def train(name: str, stage: int, aware: bool, *, seed: int = 0, load: bool = False,
              save: bool = False, bf16: bool = False) -> None:
        t = time.time()
        model = build_model(seed)
        opt = make_lamb(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, world, bf16))
        results.setdefault("wrapper", {})[name] = type(engine.optimizer).__name__
        if aware:
            make_zero_aware(opt, engine)
            results["split_tensors"][name] = split_facts(opt)
        first = 0
        if load:
            engine.load_checkpoint(str(ckpt_dir), tag=f"step{SAVE_AT}")
            # Local state only (no collective right after a load, see DESIGN.md).
            loaded = lamb_state(opt)
            saved = results.pop("_snapshot")
            results["ckpt_state_maxdiff"] = max(
                (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
                for a, b in zip(loaded, saved) for k in ("exp_avg", "exp_avg_sq", "step"))
            results["ckpt_state_keys"] = sorted(loaded[0])
            results["ckpt_step"] = float(loaded[0]["step"])
            first = SAVE_AT
        for step in range(first, STEPS):
            x, y = local[step]
            if bf16:
                x, y = x.bfloat16(), y.bfloat16()
            loss = loss_fn(engine, x, y)
            engine.backward(loss)
            engine.step()
            if save and step + 1 == SAVE_AT:
                engine.save_checkpoint(str(ckpt_dir), tag=f"step{SAVE_AT}")
                results["_snapshot"] = lamb_state(opt)
        results["params"][name] = full_params(engine, model, stage, bf16)
        results["seconds"][name] = time.time() - t
        engine.destroy()

    train("zero0_aware", 0, True)
    train("zero1_aware", 1, True)
    train("zero2_aware", 2, True, save=True)
    train("zero2_resume", 2, True, seed=99, load=True)
    train("zero3_aware", 3, True)
    train("zero2_naive", 2, False)
    train("bf16_zero1_aware", 1, True, bf16=True)
    train("bf16_zero1_naive", 1, False, bf16=True)

    # Gradient pre-normalisation cannot see all groups under ZeRO: refused with a clear error.
    model = build_model(0)
    opt = make_lamb(model, max_grad_norm=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(2, world))
    try:
        make_zero_aware(opt, engine)
        results["prenorm_error"] = None
    except UserError as e:
        results["prenorm_error"] = str(e)
    engine.destroy()

    # Every rank's view of the split tensors matters; gather the counts onto rank 0.
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results["split_tensors"])
    if rank == 0:
        results["split_tensors"] = gathered
        tmp = out / "results.pt.tmp"
        torch.save(results, tmp)
        os.replace(tmp, out / "results.pt")
    dist.barrier()
    # Tear the process group down before the interpreter does, then leave without running C++
    # static destructors: at interpreter exit a thread of the gloo/DeepSpeed stack was twice
    # destroyed unjoined ("terminate called without an active exception", SIGABRT) on a loaded
    # machine, after all work was done and the results were written.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
