"""A resume whose recipe differs from the checkpoint's, through `bertscale pretrain` itself.

What may change, and what the resumed run must then do:
- `train.steps` (and with it the LR schedule): from the first resumed step on, every update uses
  the lr the recipe's schedule gives at that step; the log says what changed.
- the ZeRO stage or the precision (a move to a bigger cluster): converted through DeepSpeed's
  universal checkpoint, the run continues.
What may not, refused in one line naming the key before any engine exists:
- anything that decides which sample sits at which global position or how it is masked
  (`train.seed`, the masking settings: bertscale.resume.STREAM_KEYS);
- the optimizer (`optimizer.name`): its state belongs to the optimizer that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bertscale import checkpoint as ckpt_lib
from pretrain_runs import manifest, pretrain, records  # noqa: F401

pytestmark = pytest.mark.slow

PEAK, WARMUP = 2e-3, 2   # tiny_ci's optimizer.lr; schedule.warmup set below
QUIET = ("eval.every=0", "eval.at_start=false", f"schedule.warmup={WARMUP}",
         "checkpoint.keep=10", "data.verify_sha256=false")


def recipe_lr(step: int, total: int) -> float:
    """The lr the update that makes step `step` must use: tiny_ci's linear schedule (warmup from
    0 over WARMUP updates, then linear decay to 0 at `total`) at scheduler count step - 1,
    written out here rather than taken from bertscale.optim."""
    s = step - 1
    if s < WARMUP:
        return PEAK * s / WARMUP
    return PEAK * (1.0 - min(1.0, (s - WARMUP) / (total - WARMUP)))


def _zero_file(ckpt: Path) -> dict:
    files = sorted(ckpt.glob("zero_pp_rank_0_*optim_states.pt"))
    assert len(files) == 1, files
    return torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]


def applied_lr(before: Path, after: Path) -> list[float]:
    """The lr each param group's update really used between two one-rank ZeRO-2 AdamW
    checkpoints one step apart, solved from the files the command wrote (it prints only the
    scheduler's value): torch's AdamW moves w by -lr * (wd * w + m_hat / (sqrt(v_hat) + eps)),
    with m, v and the step count the `after` checkpoint holds."""
    a, b = _zero_file(before), _zero_file(after)
    groups = b["base_optimizer_state"]["param_groups"]
    lrs = []
    for i, group in enumerate(groups):
        w0 = a["single_partition_of_fp32_groups"][i].double()
        w1 = b["single_partition_of_fp32_groups"][i].double()
        st = b["base_optimizer_state"]["state"][i]
        t = float(st["step"])
        beta1, beta2 = group["betas"]
        m = st["exp_avg"].double() / (1 - beta1 ** t)
        denom = (st["exp_avg_sq"].double() / (1 - beta2 ** t)).sqrt() + group["eps"]
        direction = group["weight_decay"] * w0 + m / denom
        lrs.append(float(-(w1 - w0).dot(direction) / direction.dot(direction)))
    return lrs


def test_changing_train_steps_on_resume_follows_the_new_schedule_from_the_first_step(
        manifest, tmp_path):
    """A run that ended at step 6 of 6 (lr decayed to 0) is resumed twice with more steps: on
    1 rank with train.steps=9 (an elastic 2 -> 1 resume) and again with train.steps=12 (same
    size). Every logged lr after each resume is the recipe schedule's for the new total, and the
    first update after the same-size resume really applied that lr (solved from the checkpoints
    around it).

    Failed before the fix: the first resumed step logged `lr 0.00e+00` (the old schedule's last
    rate, restored with the optimizer's param groups) and its update applied lr 0, then the new
    schedule took over from the second step, on both resumes."""
    run = tmp_path / "run"
    pretrain(run, manifest, 2, *QUIET, "train.steps=6", "checkpoint.every=3")
    out9 = pretrain(run, manifest, 1, *QUIET, "train.steps=9", "checkpoint.every=1")[0].stdout
    out12 = pretrain(run, manifest, 1, *QUIET, "train.steps=12", "checkpoint.every=1")[0].stdout
    assert "converted from 2 ranks through a universal checkpoint" in out9
    assert "train.steps 6 -> 9" in out9 and "train.steps 9 -> 12" in out12, out12[:800]

    logged = {r["step"]: r["lr"] for r in records(run, "train")}
    assert sorted(logged) == list(range(1, 13))
    for step in range(1, 13):
        total = 6 if step <= 6 else 9 if step <= 9 else 12
        assert logged[step] == pytest.approx(recipe_lr(step, total), rel=1e-9, abs=1e-12), step

    ckpts = {c.step: c.path for c in ckpt_lib.list_committed(run)}
    # The method first, inside one run (step 8 from 7), then the first update after a resume.
    for step, total in ((8, 9), (10, 12), (11, 12)):
        for lr in applied_lr(ckpts[step - 1], ckpts[step]):
            assert lr == pytest.approx(recipe_lr(step, total), rel=1e-3), (step, lr)
