"""One rank of the elastic-checkpoint test (tests/test_elastic.py), started by tests/launch.py.

It uses DeepSpeed and bertscale's model with the trainer core's DeepSpeed engine, commit and resume
path (bertscale.training), not the pretraining trainer, so it tests the checkpoint layer on its
own. Data: byte-level tokens of a real English text file shipped with Python (argparse.py's
docstrings and messages); global sample i is a deterministic function of i alone, global batch b
is samples [b*G, (b+1)*G), and rank r of W takes its contiguous slice as micro-batches of MICRO.
With equal micro-batch sizes the global gradient is the mean of the same G/MICRO micro-batch
means on any number of ranks, so losses are comparable across world sizes.

  train:  train STEPS steps on W ranks, commit `step_<SAVE>` (the model marked for universal
          conversion; the data position as the "data" component), and write the full fp32 weights
          and moments at that step (gathered *after* a step, never right after a load) plus every
          step's loss, to compare the resumed runs against.
  resume: restore `step_<SAVE>` on W' ranks through bertscale.training.checkpoint.resume.restore
          (converting when W' != W),
          write each rank's LOCAL fp32 and moment fragments with their offsets (no collectives,
          see DESIGN's trap about safe_get_full_optimizer_state after a load), then train to STEPS
          and write the losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from bertscale.config import ModelConfig
from bertscale.model import BertForPreTraining, pretraining_loss
from bertscale.pretraining.plan import plan_batch
from bertscale.training.checkpoint.checkpointer import save
from bertscale.training.checkpoint.resume import find, restore
from bertscale.training.checkpoint.state import TrainerState
from bertscale.training.deepspeed_engine import DeepSpeedEngine, DeepSpeedFactory, mark_universal

GLOBAL_BATCH = 12
MICRO = 2
SEQ = 16
PREDICTIONS = 3
SPECIAL = 4          # ids 0..3: [PAD], [MASK], [CLS], [SEP]; byte b is id b + 4
MASK_ID = 1
MOMENTS = ("exp_avg", "exp_avg_sq")


def text_ids() -> torch.Tensor:
    return torch.tensor(list(Path(argparse.__file__).read_bytes()), dtype=torch.int64) + SPECIAL


def sample(ids: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 + i)
    start = int(torch.randint(0, len(ids) - SEQ, (1,), generator=g))
    tokens = ids[start:start + SEQ].clone()
    positions = torch.randperm(SEQ - 1, generator=g)[:PREDICTIONS] + 1
    labels = tokens[positions].clone()
    tokens[positions] = MASK_ID
    return dict(input_ids=tokens, token_type_ids=(torch.arange(SEQ) >= SEQ // 2).long(),
                attention_mask=torch.ones(SEQ, dtype=torch.int64), masked_positions=positions,
                masked_labels=labels, next_sentence_label=torch.tensor(i % 2))


def micro_batches(ids: torch.Tensor, step: int, rank: int, world: int, seen: list[int]):
    """Rank `rank`'s micro-batches of global batch `step - 1` (steps count from 1); the global
    sample ids it takes are appended to `seen`."""
    per_rank = GLOBAL_BATCH // world
    first = (step - 1) * GLOBAL_BATCH + rank * per_rank
    for m in range(first, first + per_rank, MICRO):
        seen.extend(range(m, m + MICRO))
        samples = [sample(ids, i) for i in range(m, m + MICRO)]
        yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class Position:
    """The data position: the global sample counter, never a per-rank offset."""

    def __init__(self) -> None:
        self.consumed_samples = 0

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def factory(args, world: int) -> DeepSpeedFactory:
    torch.manual_seed(1234)   # same initial weights on every world size
    cfg = ModelConfig(vocab_size=256 + SPECIAL, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg)
    mark_universal(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "lamb":
        from bertscale.optim import Lamb
        optimizer = Lamb(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
    ds_config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": plan_batch(GLOBAL_BATCH, MICRO, world),
        "zero_optimization": {"stage": args.zero, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    # Warm up over 2 steps then decay linearly: the resumed lr must continue the schedule.
    return DeepSpeedFactory(model, optimizer, ds_config, lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 2, max(0.0, 1 - s / 40))), device_rank=0, world_size=world)


def train_step(engine, ids, step: int, rank: int, world: int, seen: list[int]) -> float:
    total = torch.zeros(1)
    for batch in micro_batches(ids, step, rank, world, seen):
        out = engine(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                     batch["masked_positions"])
        loss = pretraining_loss(out, batch["masked_labels"], batch["next_sentence_label"]).total
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    dist.all_reduce(total)
    return total.item() / (GLOBAL_BATCH // MICRO)


def full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full fp32 master weight and moments (collective; only after a step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    # DeepSpeed 0.19 ZeRO-1/2 links each parameter to its optimizer state once, right after the
    # FIRST param group's first step (stage_1_and_2._optimizer_step), so the second group's
    # parameters never see theirs and safe_get_full_optimizer_state raises on the ranks that own
    # them while the others wait in the all-reduce. Re-link now that every group has state.
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = {"fp32": safe_get_full_fp32_param(p).detach().clone().flatten()}
        for key in MOMENTS:
            out[name][key] = safe_get_full_optimizer_state(p, key).detach().clone().flatten()
    return out


def local_fragments(engine, rank: int) -> dict:
    """This rank's own slices of every parameter's fp32 weight and moments, with their offsets in
    the flattened parameter. Reads local memory only."""
    frags: dict[str, dict] = {}
    stage = engine.zero_optimization_stage()
    for name, p in engine.module.named_parameters():
        if stage == 3:
            part = p.ds_tensor.ds_numel
            start = rank * part
            n = max(0, min(part, p.ds_numel - start))   # the last partition carries padding
            opt = p._z3_optimizer
            entry = {"start": start, "fp32": opt.get_local_fp32_param(p)[:n].clone()}
            for key in MOMENTS:
                entry[key] = opt.get_local_fp32_param(p, key)[:n].clone()
        else:
            mapping = p._hp_mapping
            if mapping is None:
                continue            # this rank owns no part of it
            entry = {"start": mapping.lp_fragment_address.start,
                     "fp32": mapping.get_hp_fragment().detach().clone()}
            for key in MOMENTS:
                entry[key] = mapping.get_hp_fragment(key).detach().clone()
        frags[name] = entry
    lp = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()} \
        if stage != 3 else {}
    return {"params": frags, "steps": optimizer_steps(engine), "lp": lp,
            "groups": hyperparameters(engine)}


def optimizer_steps(engine) -> list[int]:
    """The step counters in the optimizer state (Adam/LAMB bias correction): one value expected."""
    return sorted({int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})


def hyperparameters(engine) -> list[dict]:
    """Each optimizer param group's settings (lr, weight_decay, betas, ...), without tensors."""
    return [{k: v for k, v in g.items() if k != "params"}
            for g in engine.optimizer.optimizer.param_groups]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "resume"])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--optim", choices=["adamw", "lamb"], default="adamw")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--save", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = text_ids()
    tag = f"step_{args.save}"
    losses: dict[int, float] = {}
    seen: list[int] = []

    position = Position()
    if args.mode == "train":
        wrapped: DeepSpeedEngine = factory(args, world).build(None)
        engine = wrapped.ds
        for step in range(1, args.steps + 1):
            losses[step] = train_step(engine, ids, step, rank, world, seen)
            position.consumed_samples += GLOBAL_BATCH
            if step == args.save:
                save(wrapped, args.run, step, TrainerState({"data": position.state_dict()}),
                     keep=2, log=lambda m: None)
                ref = full_state(engine)
                if rank == 0:
                    torch.save({"params": ref, "groups": hyperparameters(engine)},
                               args.run / "reference.pt")
        info = {"losses": losses, "world": world}
    else:
        point = find(args.run, "require")
        assert point is not None and point.checkpoint.tag == tag, point
        wrapped, start = restore(point, factory(args, world), {"data": position}, rank=rank,
                                 world_size=world, seed=0)
        engine = wrapped.ds
        assert position.consumed_samples == args.save * GLOBAL_BATCH, position.consumed_samples
        torch.save(local_fragments(engine, rank), args.run / f"loaded_w{world}_rank{rank}.pt")
        # The data position is the global sample counter, never a per-rank offset.
        for step in range(position.consumed_samples // GLOBAL_BATCH + 1, args.steps + 1):
            losses[step] = train_step(engine, ids, step, rank, world, seen)
        info = {"losses": losses, "world": world, "universal": start.universal,
                "saved_world_size": start.saved_world_size}
    (args.run / f"{args.mode}_w{world}_rank{rank}.json").write_text(
        json.dumps({"samples": seen, "steps_end": optimizer_steps(engine)}))
    if rank == 0:
        assert all(math.isfinite(v) for v in losses.values()), losses
        (args.run / f"{args.mode}_w{world}.json").write_text(json.dumps(info))
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
