"""Steps are applied optimizer updates (bertscale.pretraining.update): an update DeepSpeed skips
for gradient overflow is logged and counted, does not advance `train.steps`, the LR schedule or
the eval and checkpoint cadences, and its samples count as consumed.

Through `bertscale pretrain` with the real DeepSpeed engine (ZeRO-2, fp32, one rank, real
Wikipedia shards). The stand-in for an fp16 overflow, which cannot happen on a CPU (DeepSpeed
refuses fp16 there): `debug.overflow_at_steps` makes one gradient inf, and DeepSpeed's own check
(the ZeRO optimizer's invalid-gradient-norm test) skips the update, zeroes the gradients and does
not step the LR scheduler, exactly the calls an fp16 overflow makes. Not covered here: the fp16
loss scaler (the scale halving on overflow and growing back), which only a GPU runs
(benchmarks/gpu_check.sh runs ZeRO-2 fp16 and reports its skips).
"""

from __future__ import annotations


import torch

from pretrain_runs import manifest, pretrain, records  # noqa: F401 - fixture

STEPS, G = 8, 16
# Logged every 3 steps, so most steps are not read back when they end: the skips must still be
# counted at the step they happened (a skipped update is always read at once).
SETS = ("train.global_batch_size=16", f"train.steps={STEPS}", "checkpoint.every=4",
        "eval.every=4", "eval.at_start=false", "eval.samples=32", "logging.every=3",
        "debug.overflow_at_steps=[3, 3, 6]")
# Every 3rd step, the first and last of each invocation (stopped at 4, resumed at 5).
LOGGED = [1, 3, 4, 5, 6, 8]


def _schedule_lrs(recipe_sets: tuple[str, ...]) -> list[float]:
    """The rate of steps 1..STEPS straight from the recipe's schedule (no DeepSpeed)."""
    from bertscale.config import load_pretrain_recipe
    from bertscale.optim import build_scheduler

    recipe = load_pretrain_recipe("tiny_ci", list(recipe_sets))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optimizer.lr)
    sched = build_scheduler(opt, recipe.schedule, recipe.train.steps)
    lrs = []
    for _ in range(STEPS):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_skipped_updates_are_logged_not_counted_and_resume_keeps_the_count(manifest, tmp_path):
    run = tmp_path / "run"
    first = pretrain(run, manifest, 1, *SETS, extra=("--stop-at-step", "4"))[0]
    second = pretrain(run, manifest, 1, *SETS)[0]
    out = first.stdout + second.stdout

    # Logged: a skip record and a progress line for each skipped update.
    skip = records(run, "skip")
    assert [(r["step"], r["skipped_steps"], r["consumed_samples"]) for r in skip] == [
        (2, 1, 3 * G), (2, 2, 4 * G), (5, 3, 8 * G)], skip
    assert all(torch.isfinite(torch.tensor(r["loss"])) and "loss_scale" not in r for r in skip)
    assert out.count("update skipped (gradient overflow)") == 3
    assert "step 3/8: update skipped (gradient overflow); 1 skipped in all" in out
    assert "step 6/8: update skipped (gradient overflow); 3 skipped in all" in out

    # Counted as steps: only the applied updates, 1..8 once each, with the schedule's rate of
    # that step (a skip does not move the schedule), and the data position counts everything.
    train = records(run, "train")
    assert [r["step"] for r in train] == LOGGED
    skipped_before = {1: 0, 2: 0, 3: 2, 4: 2, 5: 2, 6: 3, 7: 3, 8: 3}
    for r in train:
        assert r["skipped_steps"] == skipped_before[r["step"]], r
        assert r["consumed_samples"] == (r["step"] + r["skipped_steps"]) * G, r
    lrs = _schedule_lrs(("train.global_batch_size=16", f"train.steps={STEPS}"))
    assert [r["lr"] for r in train] == [lrs[step - 1] for step in LOGGED]
    assert "done: 8 steps, 176 samples" in second.stdout

    # Cadences: eval and checkpoints at applied steps 4 and 8, the checkpoint state holds the
    # skip count and the consumed samples, and the resumed run went on from both.
    assert [r["step"] for r in records(run, "eval")] == [4, 8]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_4", "step_8"], ckpts
    from bertscale.training.checkpoint.layout import latest_committed
    from bertscale.training.checkpoint.state import read_state
    state = read_state(latest_committed(run)).components
    assert (state["train"]["step"], state["train"]["skipped_steps"],
            state["data"]["consumed_samples"]) == (8, 3, 11 * G)
    assert "resumed from" in second.stdout and "(step 4, 96 samples consumed" in second.stdout


def test_overflow_steps_must_be_positive(tmp_path, capsys):
    from bertscale.cli import main

    assert main(["pretrain", "tiny_ci", "--set", "debug.overflow_at_steps=[0]",
                 "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "debug.overflow_at_steps must hold positive step numbers" in err
    assert len(err.strip().splitlines()) == 1
