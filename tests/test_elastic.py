"""Elastic resume (DESIGN guarantee 4): a checkpoint written on W ranks continues on W' ranks with
the same model, optimizer state, schedule and data position.

The multi-process cases run tests/workers/elastic_worker.py (DeepSpeed + bertscale's model and
LAMB through the trainer core's engine, commit and resume, not the pretraining trainer) so they
test the checkpoint layer (bertscale.training.checkpoint: universal, resume) on its own:

  2 ranks ZeRO-2 fp32 LAMB  -> 1 rank ZeRO-2          (converts)
                            -> 3 ranks ZeRO-1         (reuses the conversion; other stage)
  1 rank ZeRO-3 bf16 AdamW  -> 2 ranks ZeRO-3

Each compares, against the uninterrupted run: every parameter's fp32 master weight and Adam/LAMB
moments right after loading (bit-exact after removing ZeRO's padding, read from each rank's local
fragments because DeepSpeed's gathering helpers misbehave right after a load), the optimizer's
param groups and step counters, the global sample ids (no repeat, no gap), and the loss curve:
the first loss after resume within 1e-6 relative (only the order of the cross-rank sum differs),
later ones within 1e-5 (fp32) / 1e-4 (bf16) relative.

The last test kills a rank of `bertscale pretrain` in the middle of writing a checkpoint and
checks that the resume takes the previous committed one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertscale.errors import ConfigError, UserError
from bertscale.pretraining.plan import plan_batch, workable_world_sizes
from bertscale.training.checkpoint import universal
from bertscale.training.checkpoint.marker import COMMIT_FILE
from launch import free_port, run_ranks

WORKER = Path(__file__).parent / "workers" / "elastic_worker.py"
SAVE, STEPS, GLOBAL_BATCH = 3, 6, 12
KEYS = ("fp32", "exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------ batch planning


def test_plan_batch_keeps_the_global_batch():
    assert plan_batch(256, 8, 4) == 8
    assert plan_batch(256, 8, 32) == 1
    assert plan_batch(12, 2, 3) == 2
    assert workable_world_sizes(12, 2) == [1, 2, 3, 6]


def test_plan_batch_names_the_world_sizes_that_work():
    with pytest.raises(ConfigError) as e:
        plan_batch(256, 8, 3)
    assert "global batch 256 is not divisible by micro batch 8 x 3 ranks" in str(e.value)
    assert "works on 1, 2, 4, 8, 16, 32 ranks" in str(e.value)
    with pytest.raises(ConfigError, match="micro batches that divide it: 1, 2, 3, 4, 6, 12"):
        plan_batch(12, 5, 2)
    with pytest.raises(ConfigError, match="world size must be a positive integer"):
        plan_batch(12, 2, 0)


def test_needs_conversion_and_config():
    assert universal.needs_conversion(2, 3) and not universal.needs_conversion(4, 4)
    cfg = {"train_batch_size": 8, "checkpoint": {"tag_validation": "Warn"}}
    out = universal.with_load_universal(cfg)
    assert out["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert cfg["checkpoint"] == {"tag_validation": "Warn"}   # the input is not modified


# ------------------------------------------------------------------------------ helpers


def launch(world: int, *args: str) -> None:
    run_ranks([str(WORKER), *args], world, timeout=300)


def loaded_state(run: Path, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Reassemble every parameter from the ranks' local fragments; NaN where no rank had it."""
    ref = torch.load(run / "reference.pt", weights_only=False)["params"]
    frags = [torch.load(run / f"loaded_w{world}_rank{r}.pt", weights_only=False)["params"]
             for r in range(world)]
    out = {}
    for name, full in ref.items():
        out[name] = {}
        for key in KEYS:
            got = torch.full_like(full[key], float("nan"))
            for f in frags:
                if name in f:
                    piece = f[name][key]
                    got[f[name]["start"]:f[name]["start"] + piece.numel()] = piece
            out[name][key] = got
    return out


def check_resume(run: Path, saved_world: int, world: int, *, later_rtol: float) -> None:
    ref = torch.load(run / "reference.pt", weights_only=False)
    got = loaded_state(run, world)
    assert len(got) == len(ref["params"]) > 30   # every BERT tensor (tied decoder counted once)
    for name, full in ref["params"].items():
        for key in KEYS:
            assert torch.equal(got[name][key], full[key]), f"{name}.{key} differs after loading"
    for r in range(world):
        rank_file = torch.load(run / f"loaded_w{world}_rank{r}.pt", weights_only=False)
        # Per-group hyperparameters (decay vs no-decay) and the step counter survive.
        assert rank_file["groups"] == ref["groups"], f"rank {r} param groups differ"
        assert rank_file["steps"] == [SAVE], f"rank {r} optimizer step counters {rank_file['steps']}"
        for name, value in rank_file["lp"].items():   # the weights the forward pass uses
            assert torch.equal(value, ref["params"][name]["fp32"].view_as(value).to(value.dtype)), name
        end = json.loads((run / f"resume_w{world}_rank{r}.json").read_text())
        assert end["steps_end"] == [STEPS], f"rank {r} ends at optimizer steps {end['steps_end']}"

    # The data position: samples before the save (old ranks) and after (new ranks) are exactly
    # the uninterrupted run's, none twice.
    before = [i for r in range(saved_world)
              for i in json.loads((run / f"train_w{saved_world}_rank{r}.json").read_text())["samples"]
              if i < SAVE * GLOBAL_BATCH]
    after = [i for r in range(world)
             for i in json.loads((run / f"resume_w{world}_rank{r}.json").read_text())["samples"]]
    assert sorted(before + after) == list(range(STEPS * GLOBAL_BATCH))

    straight = json.loads((run / f"train_w{saved_world}.json").read_text())["losses"]
    resumed = json.loads((run / f"resume_w{world}.json").read_text())
    assert resumed["universal"] and resumed["saved_world_size"] == saved_world
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(SAVE + 1, STEPS + 1)]
    first = str(SAVE + 1)
    assert resumed["losses"][first] == pytest.approx(straight[first], rel=1e-6)
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(straight[step], rel=later_rtol), f"step {step}"
    # The curve keeps falling from where it stopped (a fresh model would start near ln(V) + ln 2).
    assert resumed["losses"][str(STEPS)] < straight[str(SAVE)] < straight["1"]


# ------------------------------------------------------------------------------ 2 ranks -> 1, 3


@pytest.fixture(scope="module")
def lamb_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lamb_zero2")
    launch(2, "train", "--run", str(run), "--zero", "2", "--optim", "lamb",
           "--save", str(SAVE), "--steps", str(STEPS))
    return run


@pytest.mark.slow
def test_two_ranks_to_one_zero2_lamb(lamb_run):
    launch(1, "resume", "--run", str(lamb_run), "--zero", "2", "--optim", "lamb",
           "--save", str(SAVE), "--steps", str(STEPS))
    check_resume(lamb_run, 2, 1, later_rtol=1e-5)
    assert universal.is_committed_universal(lamb_run / "checkpoints", f"step_{SAVE}")


@pytest.mark.slow
def test_two_ranks_to_three_zero1_lamb(lamb_run):
    # Loads the ZeRO-2 checkpoint into ZeRO-1: the universal format does not care.
    launch(3, "resume", "--run", str(lamb_run), "--zero", "1", "--optim", "lamb",
           "--save", str(SAVE), "--steps", str(STEPS))
    check_resume(lamb_run, 2, 3, later_rtol=1e-5)


@pytest.mark.slow
def test_conversion_is_cached_atomic_and_refuses_what_it_cannot_carry(lamb_run, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(lamb_run / "checkpoints" / f"step_{SAVE}", ckpt / "step_3")
    # A conversion killed half-way leaves only a hidden temporary folder: never used, cleaned.
    (ckpt / ".step_3_universal.tmp-99999" / "step_3_universal").mkdir(parents=True)
    assert not universal.is_committed_universal(ckpt, "step_3")
    out = universal.convert_to_universal(ckpt, "step_3")
    assert out == ckpt / "step_3_universal" and universal.is_committed_universal(ckpt, "step_3")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_3", "step_3_universal"]
    marker = json.loads((out / COMMIT_FILE).read_text())
    assert marker["source_world_size"] == 2 and marker["zero_stage"] == 2
    stamp = (out / COMMIT_FILE).stat().st_mtime_ns
    universal.convert_to_universal(ckpt, "step_3")            # cached: not rewritten
    assert (out / COMMIT_FILE).stat().st_mtime_ns == stamp

    # The tag saved again (new files): the old conversion is stale and is redone.
    model_file = ckpt / "step_3" / "mp_rank_00_model_states.pt"
    os.utime(model_file, ns=(time.time_ns(), time.time_ns()))
    assert not universal.is_committed_universal(ckpt, "step_3")
    universal.convert_to_universal(ckpt, "step_3")
    assert universal.is_committed_universal(ckpt, "step_3")

    # Without universal_checkpoint_info DeepSpeed cannot convert: one clear error.
    sd = torch.load(model_file, weights_only=False)
    sd.pop("universal_checkpoint_info")
    torch.save(sd, model_file)
    with pytest.raises(UserError, match="has no universal_checkpoint_info"):
        universal.convert_to_universal(ckpt, "step_3")

    # Optimizer state ds_to_universal would silently drop: refused, naming the keys.
    shutil.rmtree(ckpt / "step_3")
    shutil.copytree(lamb_run / "checkpoints" / f"step_{SAVE}", ckpt / "step_3")
    optim_file = ckpt / "step_3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(optim_file, weights_only=False)
    state = sd["optimizer_state_dict"]["base_optimizer_state"]["state"]
    state[0]["momentum_buffer"] = state[0]["exp_avg"].clone()
    torch.save(sd, optim_file)
    with pytest.raises(UserError, match=r"optimizer state keys .*'momentum_buffer'.* cannot be converted"):
        universal.convert_to_universal(ckpt, "step_3")

    # A missing partition is named, not converted into a wrong checkpoint.
    (ckpt / "step_3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match=r"incomplete checkpoint, no optimizer partition for rank\(s\) 0"):
        universal.convert_to_universal(ckpt, "step_3")


# ------------------------------------------------------------------------------ 1 rank -> 2, ZeRO-3


@pytest.mark.slow
def test_one_rank_to_two_zero3_bf16(tmp_path):
    common = ("--zero", "3", "--dtype", "bf16", "--optim", "adamw",
              "--save", str(SAVE), "--steps", str(STEPS))
    launch(1, "train", "--run", str(tmp_path), *common)
    launch(2, "resume", "--run", str(tmp_path), *common)
    # bf16: the forward weights are the bf16 copies of the (exactly restored) fp32 masters.
    check_resume(tmp_path, 1, 2, later_rtol=1e-4)


# ------------------------------------------------------------------------------ killed mid-save


@pytest.mark.slow
def test_checkpoint_killed_mid_write_is_never_loaded(tmp_path, tiny_shards):
    """Rank 1 of a 2-rank `bertscale pretrain` is frozen (SIGSTOP) as soon as files of a new
    checkpoint appear and, if that checkpoint is not committed yet, killed with SIGKILL: the save
    is interrupted for sure. The resumed run must start from the previous committed checkpoint."""
    from bertscale.training.checkpoint import layout as ckpt_lib

    run_dir = tmp_path / "run"
    args = _pretrain_args(tiny_shards, run_dir, steps=40, every=2)
    port = str(free_port())
    procs = [_start_rank(args, r, 2, port, tmp_path) for r in range(2)]
    root = run_dir / "checkpoints"
    victim = None
    deadline = time.monotonic() + 240
    try:
        while victim is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            # Only once an earlier checkpoint is committed: that is the one to fall back to.
            if ckpt_lib.latest_committed(run_dir) is None:
                time.sleep(0.001)
                continue
            for d in sorted(root.glob("step_*")):
                if d.name.endswith("_universal") or (d / COMMIT_FILE).exists():
                    continue
                if not any(d.glob("*.pt")):
                    continue            # wait until the ranks have started writing their files
                procs[1].send_signal(signal.SIGSTOP)
                if not (d / COMMIT_FILE).exists():
                    victim = d.name
                    procs[1].kill()
                    written = sorted(p.name for p in d.iterdir())
                    break
                procs[1].send_signal(signal.SIGCONT)   # lost the race: try the next save
            time.sleep(0.001)
    finally:
        for p in procs:
            if p.poll() is None and victim is not None:
                p.wait(timeout=120)    # rank 0 must notice its peer died and exit
            if p.poll() is None:
                p.kill()
                p.wait()
    assert victim is not None, "no checkpoint could be interrupted mid-write"
    assert procs[0].returncode != 0
    interrupted = int(victim.split("_")[1])
    committed = ckpt_lib.latest_committed(run_dir)
    assert committed is not None and committed.step < interrupted
    assert not (root / victim / COMMIT_FILE).exists()

    results = run_ranks(["-m", "bertscale.cli", *args, "--stop-at-step", str(interrupted + 2)], 2,
                        timeout=300)
    log = results[0].stdout + results[0].stderr
    assert f"resumed from {committed.path} (step {committed.step}" in log, log[-3000:]
    assert ckpt_lib.latest_committed(run_dir).step == interrupted + 2
    print(f"killed rank 1 while {victim} held {written}; resumed from step {committed.step}")


def _pretrain_args(manifest: Path, run_dir: Path, *, steps: int, every: int) -> list[str]:
    sets = [f"data.manifest={manifest}", f"train.steps={steps}", f"checkpoint.every={every}",
            "train.global_batch_size=8", "train.micro_batch_size=4", "eval.at_start=false",
            "eval.every=0"]
    return ["pretrain", "tiny_ci", "--run-dir", str(run_dir), "--no-wandb",
            *[a for kv in sets for a in ("--set", kv)]]


def _start_rank(args: list[str], rank: int, world: int, port: str, logs: Path) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    # Output to files, not pipes nobody reads while the run goes on (a full pipe blocks it).
    out = open(logs / f"rank{rank}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "bertscale.cli", *args], env=env,
                            stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, shared_data) -> Path:
    """Shards prepared by `bertscale prepare` from a real Wikipedia file (a small vocabulary
    trained on it keeps the model fast)."""
    out = tmp_path_factory.mktemp("shards")
    from bertscale.commands.prepare import main as prepare
    rc = prepare([str(shared_data / "wikipedia" / "wiki_00.gz"), "--out", str(out),
                  "--train-vocab", "2000", "--seq-len", "64", "--samples-per-shard", "200",
                  "--progress", "none"])
    assert rc == 0
    return out / "seq64" / "manifest.json"
