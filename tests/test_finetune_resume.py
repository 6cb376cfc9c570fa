"""What fine-tuning gains from the trainer core, through `bertscale finetune` on two real ranks
(gloo, loopback): committed checkpoints, preemption, exact resume, and the NaN stop.

One reference: a straight 2-rank run (a random 2-layer BERT, dropout ON, 48 real MRPC pairs in
global batches of 4: 24 steps over two epochs, a checkpoint committed at every step). Against
it, step by step (metrics.jsonl's loss at every step):

- a run whose rank 1 alone gets SIGTERM (a preempted node's signal) as training starts: both
  ranks commit a checkpoint at the next read and exit 75; the same command again resumes there
  and ends with the straight run's losses and dev metrics exactly. With dropout on, that needs
  every rank's RNG restored (before the trainer core, rank 0's alone was saved) and the data
  position restored without replaying the batches before it.
- a run whose rank 1 is frozen while it writes a checkpoint and killed (SIGKILL) before the
  commit: the save never commits, the re-run takes the checkpoint before it and again ends with
  the straight run's losses. Before the trainer core a fine-tuning save was one train_state.pt
  written by rank 0, with no commit marker.
- a learning rate of 1e30: the loss becomes NaN/inf; both ranks stop with exit 3, rank 0 says
  so in one error line (no traceback), and nothing is saved from that step on. Before the
  trainer core this was a RuntimeError traceback and exit 1.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from finetune_helpers import tiny_hf_checkpoint
from launch import run_ranks, start_ranks

pytestmark = pytest.mark.slow

RUN = Path("MRPC") / "runs" / "lr0.0001-seed1"
STEPS = 24


def _argv(checkpoint: Path, out: Path, glue_dir: Path, *extra: str) -> list[str]:
    return ["-m", "bertscale.cli", "finetune", "glue", "--task", "MRPC", "--data-dir",
            str(glue_dir), "--checkpoint", str(checkpoint), "--output-dir", str(out),
            "--lr", "1e-4", "--batch-size", "4", "--epochs", "2", "--max-train-samples", "48",
            "--max-eval-samples", "16", "--max-seq-length", "64", "--no-test", "--device", "cpu",
            "--precision", "fp32", "--log-every", "1", "--checkpoint-every", "1", *extra]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / RUN / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _committed(out: Path) -> list[int]:
    root = out / RUN / "checkpoints"
    return sorted(int(p.parent.name.split("_")[1]) for p in root.glob("step_*/commit.json"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, minilm_dir):
    root = tmp_path_factory.mktemp("ft-resume")
    ckpt = tiny_hf_checkpoint(root / "ckpt", minilm_dir / "vocab.txt")
    straight = root / "straight"
    run_ranks(_argv(ckpt, straight, shared_data / "glue"), 2, timeout=600)
    losses = _losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert not (straight / RUN / "checkpoints").exists(), "a finished run keeps no checkpoint"
    return root, ckpt, straight, shared_data / "glue"


def _wait_for(proc, text: str, timeout: float = 300) -> str:
    """Rank 0's stderr up to the first line holding `text`."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen[-3000:]
        seen += proc.stderr.readline()
    return seen


def test_preemption_of_one_rank_commits_exits_75_and_the_rerun_equals_the_straight_run(setup):
    root, ckpt, straight, glue = setup
    out = root / "preempted"
    procs = start_ranks(_argv(ckpt, out, glue), 2)
    try:
        err0 = _wait_for(procs[0], "48 examples, 2 epochs = 24 steps")  # handlers installed
        procs[1].send_signal(signal.SIGTERM)                   # ONE rank only
        rest = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err0 += rest[0][1]
    assert [p.returncode for p in procs] == [75, 75], err0[-3000:] + rest[1][1][-3000:]
    stopped = _committed(out)[-1]
    assert 1 <= stopped < STEPS
    assert (f"preempted (SIGTERM on rank 1): checkpoint step {stopped} committed; exiting with "
            f"code 75") in err0
    assert not (out / RUN / "results.json").exists() and "Traceback" not in err0

    results = run_ranks(_argv(ckpt, out, glue), 2, timeout=600)
    assert f"resuming from the step-{stopped} checkpoint" in results[0].stderr
    assert _losses(out) == pytest.approx(_losses(straight), rel=1e-6, abs=0)
    a = json.loads((straight / RUN / "results.json").read_text())
    b = json.loads((out / RUN / "results.json").read_text())
    assert b["metrics"] == a["metrics"] and b["train"]["resumed_from_step"] == stopped
    assert not (out / RUN / "checkpoints").exists()


def test_a_save_killed_before_its_commit_is_never_loaded(setup):
    root, ckpt, straight, glue = setup
    out = root / "killed"
    logs = root / "killed-logs"
    logs.mkdir()
    procs = start_ranks(_argv(ckpt, out, glue), 2,
                        stdout=lambda r: open(logs / f"out{r}", "w"),
                        stderr=lambda r: open(logs / f"err{r}", "w"))
    ckpts, victim = out / RUN / "checkpoints", None
    deadline = time.monotonic() + 300
    try:
        while victim is None and time.monotonic() < deadline and procs[1].poll() is None:
            if not _committed(out):   # one committed checkpoint first: the one to fall back to
                time.sleep(0.001)
                continue
            for d in sorted(ckpts.glob("step_*")):
                if (d / "commit.json").exists() or not any(d.glob("*.pt")):
                    continue
                procs[1].send_signal(signal.SIGSTOP)
                if not (d / "commit.json").exists():
                    victim = d
                    procs[1].kill()
                    break
                procs[1].send_signal(signal.SIGCONT)   # lost the race: the next save
            time.sleep(0.001)
    finally:
        for p in procs:
            if p.poll() is None and victim is not None:
                p.wait(timeout=120)                    # rank 0 notices its peer is gone
            if p.poll() is None:
                p.kill()
                p.wait()
    assert victim is not None, "no save could be interrupted before its commit"
    interrupted = int(victim.name.split("_")[1])
    before = [s for s in _committed(out) if s < interrupted]
    assert before and not (victim / "commit.json").exists()
    assert not (out / RUN / "results.json").exists()

    results = run_ranks(_argv(ckpt, out, glue), 2, timeout=600)
    assert f"resuming from the step-{before[-1]} checkpoint" in results[0].stderr
    assert _losses(out) == pytest.approx(_losses(straight), rel=1e-6, abs=0)
    assert not (out / RUN / "checkpoints").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_nan_loss_stops_every_rank_with_exit_3_and_one_line(setup):
    root, ckpt, _, glue = setup
    out = root / "nan"
    argv = _argv(ckpt, out, glue, "--warmup", "0")
    argv[argv.index("--lr") + 1] = "1e30"
    results = run_ranks(argv, 2, timeout=600, check=False)
    assert [r.returncode for r in results] == [3, 3], results[0].stderr[-3000:]
    err = results[0].stderr
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: step "), err[-3000:]
    nan_step = int(errors[0].split()[2].rstrip(":"))
    assert "loss is NaN/inf" in errors[0] and "try a smaller learning rate" in errors[0]
    assert "Traceback" not in err and "Traceback" not in results[1].stderr
    assert results[1].stderr.count("error:") == 0           # rank 0 alone says it
    assert all(s < nan_step for s in _committed(out)), (nan_step, _committed(out))
    assert not (out / RUN / "results.json").exists()
