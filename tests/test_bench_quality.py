"""`bertscale bench quality` end to end at toy size, so that the benchmark cannot rot.

One invocation of the command a user types runs every stage on real text (one Wikipedia extract,
a 1,000-token WordPiece vocabulary trained from it, the tiny shape, a few seconds of budget per
side, RTE and STS-B with 64 training examples and 2 seeds): `bertscale prepare`, the calibrated
`bertscale pretrain`, transformers' BertForMaskedLM on the same batches, `bertscale export`, the
random-init folder and `bertscale finetune glue` of all three. A second invocation must skip
every stage; a third with other settings must be refused. No number is asserted about speed or
quality (that is the benchmark's job); what is asserted is the shape and the fairness of what it
measures: both curves at increasing wall-clock and tokens on the same held-out set size, the same
tokens in every step both sides took, every (task, model) cell, three folders of the same shape.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from bertscale.bench.quality import MODEL_LABELS, MODELS

TASKS = ["RTE", "STS-B"]
EVAL_SAMPLES = 16


def _bench(out: Path, shared: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--data", str(shared / "wikipedia" / "wiki_00.gz"), "--glue", str(shared / "glue"),
            "--train-vocab", "1000", "--out", str(out),
            "--set", "model.preset=tiny", "--set", "train.global_batch_size=16",
            "--set", "train.micro_batch_size=8", "--budget-min", "0.1", "--calibrate-steps", "3",
            "--evals", "3", "--eval-samples", str(EVAL_SAMPLES), "--tasks", ",".join(TASKS),
            "--seeds", "1,2", "--epochs", "1", "--max-train-samples", "64",
            "--max-eval-samples", "32", "--threads", "1", "--prepare-workers", "1", *extra]
    return subprocess.run([sys.executable, "-m", "bertscale.cli", "bench", "quality", *args],
                          capture_output=True, text=True, timeout=1200, check=False)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three invocations, ~10 trainer / fine-tuning starts: minutes here
def test_bench_quality_whole_path_at_toy_size(shared_data: Path, tmp_path: Path):
    out = tmp_path / "quality"
    first = _bench(out, shared_data)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    # Both pretraining curves: held-out loss at increasing training time and tokens, from the
    # untrained model (step 0) on, on the same number of held-out samples, and it went down.
    pre = results["pretraining"]
    for side in ("bertscale", "transformers"):
        curve = pre[side]["curve"]
        assert len(curve) >= 2 and curve[0]["step"] == 0, (side, curve)
        assert [p["eval_samples"] for p in curve] == [EVAL_SAMPLES] * len(curve), side
        for before, after in pairwise(curve):
            assert after["step"] > before["step"], (side, curve)
            assert after["train_s"] > before["train_s"], (side, curve)
            assert after["tokens"] > before["tokens"], (side, curve)
        assert all(math.isfinite(p["mlm_loss"]) and 0 <= p["mlm_acc"] <= 1 for p in curve)
        assert curve[-1]["mlm_loss"] < curve[0]["mlm_loss"], (side, curve)
        assert pre[side]["steps"] == results["calibration"]["steps"][side] == curve[-1]["step"]
        assert pre[side]["tokens"] == sum(pre[side]["tokens_per_step"])
    # The same batches: every step both sides took held the same number of real tokens (the
    # same samples in the same order; bertscale's from its own metrics.jsonl, transformers' as
    # counted by the benchmark's own loop).
    a, c = pre["bertscale"]["tokens_per_step"], pre["transformers"]["tokens_per_step"]
    n = min(len(a), len(c))
    assert n >= 1 and a[:n] == c[:n], (a, c)

    # Every (task, model) cell, 2 seeds each, in the JSON and in the markdown table.
    for t in TASKS:
        for m in MODELS:
            cell = results["glue"][t][m]
            assert cell["n"] == 2 and cell["std"] is not None, (t, m, cell)
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| (")}
    for m in MODELS:
        cells = [x.strip() for x in rows[MODEL_LABELS[m]].split("|")[2:-1]]
        assert len(cells) == len(TASKS) + 1 and all("±" in x for x in cells[:-1]), rows
    assert "Targets:" in table

    # Three Hugging Face folders of one shape: (a) exported, (c) saved by transformers, (b) random.
    shapes = set()
    for m in MODELS:
        cfg = json.loads((out / "models" / m / "config.json").read_text())
        assert (out / "models" / m / "vocab.txt").is_file()
        shapes.add((cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                    cfg["intermediate_size"], cfg["vocab_size"]))
    assert shapes == {(2, 128, 2, 512, 1000)}, shapes

    # The plot, or the one line saying why not.
    if results["plot"]:
        assert (out / "pretraining_curves.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in first.stderr

    # Resumable: a second invocation runs nothing and rewrites no stage.
    stages = sorted((out / "stages").glob("*.json"))
    assert len(stages) == 9, stages
    before = {p.name: p.read_text() for p in stages}
    second = _bench(out, shared_data)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("done earlier, skipped") == len(stages), second.stderr
    assert "$ bertscale" not in second.stderr  # no prepare / pretrain / export / finetune ran
    assert {p.name: p.read_text() for p in stages} == before

    # Other settings into the same folder: one clear line, nothing run.
    third = _bench(out, shared_data, "--lr", "5e-5")
    assert third.returncode == 2, third.stderr
    assert "other settings (lr differ)" in third.stderr and "Traceback" not in third.stderr
