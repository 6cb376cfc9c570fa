"""A resume whose recipe differs from the checkpoint's, through `bertscale pretrain` itself.

What may change, and what the resumed run must then do:
- `train.steps` (and with it the LR schedule): from the first resumed step on, every update uses
  the lr the recipe's schedule gives at that step; the log says what changed.
- the ZeRO stage or the precision (a move to a bigger cluster): converted through DeepSpeed's
  universal checkpoint, the run continues.
What may not, refused in one line naming the key before any engine exists:
- anything that decides which sample sits at which global position or how it is masked
  (`train.seed`, the masking settings: bertscale.training.checkpoint.resume.STREAM_KEYS);
- the optimizer (`optimizer.name`): its state belongs to the optimizer that wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bertscale.training.checkpoint import layout as ckpt_lib
from pretrain_runs import (cached, manifest, pretrain, records, train_losses,  # noqa: F401
                          two_rank_env)

pytestmark = pytest.mark.slow

PEAK, WARMUP = 2e-3, 2   # tiny_ci's optimizer.lr; schedule.warmup set below
# Dropout off: a conversion reseeds the dropout streams, and the engine-change test compares
# losses with a run that did not convert.
QUIET = ("eval.every=0", "eval.at_start=false", f"schedule.warmup={WARMUP}",
         "checkpoint.keep=10", "data.verify_sha256=false", "train.global_batch_size=8",
         "train.micro_batch_size=4", "model.hidden_dropout_prob=0.0",
         "model.attention_probs_dropout_prob=0.0")


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
        w0 = a["single_partition_of_fp32_groups"][i].detach().double()
        w1 = b["single_partition_of_fp32_groups"][i].detach().double()
        st = b["base_optimizer_state"]["state"][i]
        t = float(st["step"])
        beta1, beta2 = group["betas"]
        m = st["exp_avg"].double() / (1 - beta1 ** t)
        denom = (st["exp_avg_sq"].double() / (1 - beta2 ** t)).sqrt() + group["eps"]
        direction = group["weight_decay"] * w0 + m / denom
        lrs.append(float(-(w1 - w0).dot(direction) / direction.dot(direction)))
    return lrs


@pytest.fixture(scope="module")
def extended(manifest, tmp_path_factory) -> tuple[Path, str, str]:
    """A run that ended at step 6 of 6 on 2 ranks (its lr decayed to 0), resumed on 1 rank with
    train.steps=9 (an elastic 2 -> 1 resume that changes the schedule), then again with
    train.steps=12 (same size). Returns the run folder and the two resumes' outputs."""
    def build():
        run = tmp_path_factory.mktemp("extended") / "run"
        pretrain(run, manifest, 2, *QUIET, "train.steps=6", "checkpoint.every=3")
        out9 = pretrain(run, manifest, 1, *QUIET, "train.steps=9", "checkpoint.every=1")[0].stdout
        out12 = pretrain(run, manifest, 1, *QUIET, "train.steps=12",
                         "checkpoint.every=1")[0].stdout
        return run, out9, out12
    return cached("resume_changes_extended", build)


def test_changing_train_steps_on_resume_follows_the_new_schedule_from_the_first_step(extended):
    """Every logged lr after each resume of `extended` is the recipe schedule's for the new
    total, and the first update after the same-size resume really applied that lr (solved from
    the checkpoints around it). A resume that changes only train.steps (and the checkpoint
    cadence) goes on, and says what changed.

    Failed before the fix (run against the unfixed code): steps 7 and 10 logged lr 0.0 (the
    old schedule's last rate, restored with the optimizer's param groups; the recipe's are
    8.57e-4 and 6.0e-4) and their updates applied it, then the new schedule took over from the
    second step, on both resumes."""
    run, out9, out12 = extended
    logged = {r["step"]: r["lr"] for r in records(run, "train")}
    assert sorted(logged) == list(range(1, 13))
    for step in range(1, 13):
        total = 6 if step <= 6 else 9 if step <= 9 else 12
        assert logged[step] == pytest.approx(recipe_lr(step, total), rel=1e-9, abs=1e-12), step
    assert "converted from 2 ranks through a universal checkpoint" in out9
    assert "train.steps 6 -> 9" in out9 and "train.steps 9 -> 12" in out12, out12[:800]

    ckpts = {c.step: c.path for c in ckpt_lib.list_committed(run)}
    # The method first, inside one run (step 8 from 7), then the first updates after a resume.
    for step, total in ((8, 9), (10, 12), (11, 12)):
        for lr in applied_lr(ckpts[step - 1], ckpts[step]):
            assert lr == pytest.approx(recipe_lr(step, total), rel=1e-3), (step, lr)


def _cli(args: list[str]) -> int:
    from bertscale.cli import main
    return main(args)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("key, value", [
    ("train.seed", "99"), ("data.mask_prob", "0.2"), ("data.max_predictions_per_seq", "19"),
    ("data.whole_word_masking", "true"), ("optimizer.name", "\"lamb\"")])
def test_a_resume_that_changes_the_stream_or_the_optimizer_is_refused(
        extended, manifest, two_rank_env, capsys, key, value):
    """Refused in one line naming the key, before any process group (this process claims rank 0
    of 2 with nobody listening: reaching it would hang), the checkpoints untouched.

    Failed before the fix: another train.seed (or masking) resumed and reordered the data
    (step 76 loss 7.87 against 8.36 uninterrupted; samples of the epoch repeated or skipped);
    another optimizer.name failed at the first step with KeyError: 'implementation'."""
    from bertscale.training.checkpoint.resume import STREAM_KEYS
    run, _, _ = extended
    before = [c.step for c in ckpt_lib.list_committed(run)]
    sets = [*QUIET, "train.steps=14", f"{key}={value}"]
    args = ["pretrain", "tiny_ci", "--run-dir", str(run),
            "--set", f"data.manifest={json.dumps(str(manifest))}"]
    for s in sets:
        args += ["--set", s]
    assert _cli(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and key in err[0] and "Traceback" not in err[0], err
    assert (STREAM_KEYS.get(key, "optimizer state") in err[0]), err[0]
    assert f"Resume with --set {key}=" in err[0], err[0]
    assert [c.step for c in ckpt_lib.list_committed(run)] == before


def _zero_steps(ckpt: Path) -> set[int]:
    state = _zero_file(ckpt)
    inner = state.get("base_optimizer_state") or state["optimizer_state_dict"]
    return {int(s["step"]) for s in inner["state"].values()}


def test_a_resume_on_another_zero_stage_or_precision_continues_the_run(extended, manifest,
                                                                        tmp_path):
    """Moving a run to a bigger cluster changes its DeepSpeed config: from `extended`'s step 12
    (ZeRO-2 fp32), step 13 on ZeRO-3 fp32, step 14 on ZeRO-1 bf16 (DeepSpeed's BF16_Optimizer,
    other checkpoint files), step 15 back on ZeRO-2 fp32, each resume converted through the
    universal checkpoint; against the same run continued on ZeRO-2 fp32 throughout. Dropout is
    off, so step 13 (computed from the converted ZeRO-2 weights inside ZeRO-3) must match to
    fp32 rounding (measured: 1.4e-7 relative); steps 14 and 15 carry bf16's rounding (measured:
    4.6e-5 and 4.0e-5; 1e-3 allowed, while Adam moments lost in a conversion would restart the
    update). The optimizer's step counts reach 15: the counts came along every conversion.

    Failed before the fix: the ZeRO-3 resume died in DeepSpeed's state_dict_factory with an
    AssertionError traceback; the bf16 one with FileNotFoundError for bf16_zero_pp_rank_0."""
    run, _, _ = extended
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    for dest in (ref, moved):
        shutil.copytree(run, dest)
    pretrain(ref, manifest, 1, *QUIET, "train.steps=15", "checkpoint.every=1")
    outs = [pretrain(moved, manifest, 1, *QUIET, "train.steps=15", "checkpoint.every=1",
                     f"train.deepspeed=\"{ds}\"", extra=("--stop-at-step", str(stop)))[0].stdout
            for ds, stop in (("zero3_fp32", 13), ("zero1_bf16", 14), ("zero2_fp32", 15))]
    for out, change in zip(outs, ("ZeRO-2 fp32 -> ZeRO-3 fp32", "ZeRO-3 fp32 -> ZeRO-1 bf16",
                                  "ZeRO-1 bf16 -> ZeRO-2 fp32")):
        assert f"engine changed since the checkpoint: {change}" in out, out[:1500]
    want, got = train_losses(ref), train_losses(moved)
    assert got[13] == pytest.approx(want[13], rel=2e-5)
    for step in (14, 15):
        assert got[step] == pytest.approx(want[step], rel=1e-3), step
    assert _zero_steps(ckpt_lib.latest_committed(moved).path) == {15}
    assert list(ckpt_lib.latest_committed(moved).path.glob("zero_pp_rank_0_*optim_states.pt"))


class _Untouchable:
    """A recipe section the train loader must not read (the walk below covers only [data] and
    [train]): any attribute access fails the test."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        raise AssertionError(f"the train loader reads {self._name}.{attr}: walk that section too")


def _changed_value(section: str, field: dataclasses.Field, value, tmp_path: Path, manifest: Path):
    """Another valid value for a recipe field (None: the field is the data set itself)."""
    special = {("data", "manifest"): None,   # the data set: its identity is the manifest's
               ("data", "shard_base"): str(manifest.parent),     # the same shards, named so
               ("data", "cache_dir"): tmp_path / "cache", ("train", "init_from"): tmp_path,
               ("train", "deepspeed"): "zero1_fp32", ("data", "bad_sample_policy"): "skip"}
    if (section, field.name) in special:
        return special[(section, field.name)]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    raise AssertionError(f"{section}.{field.name} = {value!r}: the walk has no other value for "
                         f"it; add one")


def test_stream_keys_are_every_loader_setting_that_moves_a_sample_or_a_mask(manifest, tmp_path):
    """Library level (which keys reach the sample stream is a property of the loader the command
    builds, which no command shows): every field of the sections `bertscale pretrain`'s train
    loader reads ([data], [train]; any other section raises if touched) is changed in turn, and
    the loader built by bertscale.pretraining.build.train_loader reads the same 64 global
    positions from a resumed position across an epoch boundary. The fields that change a token,
    a pair label or a mask must be exactly bertscale.training.checkpoint.resume.STREAM_KEYS, the keys a resume
    refuses to change: a new loader setting that moves the stream fails here until it is
    listed there."""
    from bertscale.config import load_pretrain_recipe
    from bertscale.data.shards import read_manifest
    from bertscale.pretraining import build
    from bertscale.training.checkpoint.resume import STREAM_KEYS

    recipe = load_pretrain_recipe("tiny_ci", [f"data.manifest={json.dumps(str(manifest))}"])
    m = read_manifest(manifest)
    start = m.num_samples("train") - 24     # 24 samples of epoch 0, 40 of epoch 1

    def stream(data, train) -> dict[str, np.ndarray]:
        others = {name: _Untouchable(name) for name in ("model", "optimizer", "schedule", "eval",
                                                         "checkpoint", "logging", "debug", "fast")}
        plan = SimpleNamespace(recipe=SimpleNamespace(data=data, train=train, **others),
                               env=SimpleNamespace(rank=0, world_size=1, is_main=True), manifest=m)
        loader = build.train_loader(plan)
        loader.load_state_dict({"consumed_samples": start})
        got: dict[str, list[np.ndarray]] = {}
        n = 0
        for batch in loader:
            for k, v in batch.items():
                got.setdefault(k, []).append(v.numpy())
            n += len(batch["input_ids"])
            if n >= 64:
                break
        loader.close()
        return {k: np.concatenate(v)[:64] for k, v in got.items()}

    def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and (a[k] == b[k]).all()
                                            for k in a)

    reference = stream(recipe.data, recipe.train)
    assert stream(recipe.data, recipe.train) is not reference and same(
        stream(recipe.data, recipe.train), reference)     # the comparison is deterministic
    moved, walked = set(), []
    for name in ("data", "train"):
        section = getattr(recipe, name)
        for f in dataclasses.fields(section):
            value = _changed_value(name, f, getattr(section, f.name), tmp_path, manifest)
            if value is None:
                continue
            changed = dataclasses.replace(section, **{f.name: value})
            data, train = (changed, recipe.train) if name == "data" else (recipe.data, changed)
            walked.append(f"{name}.{f.name}")
            if not same(stream(data, train), reference):
                moved.add(f"{name}.{f.name}")
    assert len(walked) >= 20, walked
    assert moved == set(STREAM_KEYS), (sorted(moved), sorted(STREAM_KEYS))
