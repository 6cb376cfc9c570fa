"""Data-parallel fine-tuning: two real rank processes (gloo, loopback) train the same model as
one process does, and share the prediction work.

The reference is the single-process run of the same command. The checkpoint is the real
all-MiniLM-L6-v2 with dropout off (conftest.minilm_no_dropout): with dropout on, each rank
draws its own masks and no run could be compared number for number with another.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bertscale.cli import main as bertscale
from launch import run_ranks

pytestmark = pytest.mark.slow


def _argv(checkpoint: Path, out: Path, glue_dir: Path) -> list[str]:
    # 45 training pairs in batches of 8: six steps, the last one of 5 pairs (shared 3 / 2);
    # 45 dev pairs in prediction batches of 8: six batches, dealt 3 / 3 to two ranks.
    return ["finetune", "glue", "--task", "STS-B", "--data-dir", str(glue_dir),
            "--checkpoint", str(checkpoint), "--output-dir", str(out), "--lr", "5e-5",
            "--batch-size", "8", "--epochs", "1", "--max-train-samples", "45",
            "--max-eval-samples", "45", "--eval-batch-size", "8", "--no-test",
            "--device", "cpu", "--precision", "fp32", "--log-every", "1"]


def _scores(out: Path) -> np.ndarray:
    lines = (out / "STS-B" / "runs" / "lr5e-05-seed1" / "dev_predictions.tsv").read_text()
    return np.array([float(line.split("\t")[1]) for line in lines.strip().splitlines()[1:]])


def _step_losses(out: Path) -> list[float]:
    """Every step's global-batch loss, from the run's metrics.jsonl (written by rank 0)."""
    lines = (out / "STS-B" / "runs" / "lr5e-05-seed1" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_two_ranks_fine_tune_like_one_process(minilm_no_dropout: Path, shared_data: Path,
                                               tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    glue_dir = shared_data / "glue"
    assert bertscale(_argv(minilm_no_dropout, tmp_path / "one", glue_dir)) == 0
    losses1 = _step_losses(tmp_path / "one")
    results = run_ranks(["-m", "bertscale.cli", *_argv(minilm_no_dropout, tmp_path / "two",
                                                       glue_dir)],
                        2, env={"OMP_NUM_THREADS": "1"}, timeout=400, watch_exit=True)
    assert [r.group_threads_at_exit for r in results] == [[], []]  # see test_pretrain's preemption test
    one = json.loads((tmp_path / "one" / "STS-B" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "STS-B" / "results.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    r1, r2 = one["runs"][0], two["runs"][0]
    assert r1["train_steps"] == r2["train_steps"] == 6
    # The global batch's loss at every step (rank 0 logs it), the uneven last batch included.
    losses2 = _step_losses(tmp_path / "two")
    assert len(losses1) == len(losses2) == 6, results[0].stderr[-2000:]
    np.testing.assert_allclose(losses2, losses1, atol=2e-4, rtol=0)
    assert math.isclose(r1["train_loss_last20_mean"], r2["train_loss_last20_mean"], rel_tol=1e-5)
    s1, s2 = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert s1.shape == s2.shape == (45,)
    assert s1.std() > 1e-3                       # the model moved: matching is not trivial
    np.testing.assert_allclose(s2, s1, atol=1e-4, rtol=0)
    for k in ("pearson", "spearman"):
        assert r2["metrics"][k] == pytest.approx(r1["metrics"][k], abs=1e-4)
    # Rank 0 alone wrote and printed; rank 1 said nothing.
    assert "STS-B  pearson" in results[0].stdout
    assert results[1].stdout.strip() == "" and "train 1/6 steps" not in results[1].stderr
    assert "train 1/6 steps" in results[0].stderr


def test_a_global_batch_smaller_than_the_ranks_is_refused(minilm_no_dropout: Path,
                                                           shared_data: Path, tmp_path: Path) -> None:
    argv = _argv(minilm_no_dropout, tmp_path / "x", shared_data / "glue")
    argv[argv.index("--batch-size") + 1] = "1"
    results = run_ranks(["-m", "bertscale.cli", *argv], 2, env={"OMP_NUM_THREADS": "1"},
                        timeout=300, check=False)
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-2000:]
    assert "--batch-size 1 is the global batch and cannot be shared by 2 ranks" in \
        results[0].stderr
    assert not (tmp_path / "x" / "STS-B" / "results.json").exists()
