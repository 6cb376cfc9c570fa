"""Shared pieces of the trainer tests (test_pretrain.py, test_checkpoint.py): real Wikipedia
shards prepared once per session, and real `bertscale pretrain` runs as separate rank processes.

Runs are cached per session (`cached`), because a 2-rank DeepSpeed start costs 10-20 s here: the
tests of both files look at the same few runs from different sides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from launch import RankResult, run_ranks

_CACHE: dict[str, Any] = {}
WIKI_FILES = ("wiki_00.gz", "wiki_01.gz")


def cached(key: str, build: Callable[[], Any]) -> Any:
    """One value per session even when two test modules import the same fixture."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def prepare_wiki(shared_data: Path, out: Path, *, vocab: str = "bert-base-uncased-vocab.txt",
                 seed: int = 12345, seq_len: int = 128) -> Path:
    """NSP shards from two real Wikipedia files; returns the manifest."""
    from bertscale.data.prepare import PrepareConfig, run_prepare

    manifests = run_prepare(PrepareConfig(
        inputs=[str(shared_data / "wikipedia" / f) for f in WIKI_FILES], out=out,
        vocab=shared_data / "vocab" / vocab, seq_lens=[seq_len], samples_per_shard=1000,
        eval_fraction=0.05, seed=seed, progress="none"))
    return manifests[seq_len]


def last_error_line(stderr: str) -> str:
    """The last line a rank wrote, without the "[rank N] " the CLI puts before other ranks'
    messages than rank 0's (so the same message compares equal)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return re.sub(r"^(bertscale \w+: error: )\[rank \d+\] ", r"\1", lines[-1]) if lines else ""


def same_error_line(results: list[RankResult], *needles: str) -> str:
    """Every rank exited 2 with the same last line (returned), which holds every needle, and no
    traceback."""
    assert [r.returncode for r in results] == [2] * len(results), \
        [r.stderr[-1500:] for r in results]
    assert not [r.rank for r in results if "Traceback" in r.stderr], results[0].stderr[-3000:]
    lines = {last_error_line(r.stderr) for r in results}
    assert len(lines) == 1, lines           # the same one line on every rank
    line = lines.pop()
    for needle in needles:
        assert needle in line, line
    return line


def pretrain_argv(run_dir: Path, manifest: Path, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    argv = ["-m", "bertscale.commands.pretrain", "tiny_ci", "--run-dir", str(run_dir),
            "--set", f"data.manifest={json.dumps(str(manifest))}"]
    for s in sets:
        argv += ["--set", s]
    return argv + list(extra)


def pretrain(run_dir: Path, manifest: Path, world: int, *sets: str, extra: tuple[str, ...] = (),
             check: bool = True, watch_exit: bool = False) -> list[RankResult]:
    """`bertscale pretrain tiny_ci` as `world` real rank processes on loopback."""
    return run_ranks(pretrain_argv(run_dir, manifest, *sets, extra=extra), world, check=check,
                     timeout=400, watch_exit=watch_exit)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss; a resumed run's later records win (they are the ones it used)."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def plain_eval(model, manifest: Path, micro: int, seed: int, samples: int,
               masking=None) -> dict[str, float]:
    """The run's held-out evaluation (the first `samples` of the eval split) redone in one
    process without DeepSpeed: one rank, since the eval set does not depend on the ranks."""
    from bertscale.data.loader import LoaderConfig, open_loader
    from bertscale.data.masking import MaskingConfig
    from bertscale.model import pretraining_loss

    sums = torch.zeros(6, dtype=torch.float64)
    model.eval()
    loader = open_loader(manifest, LoaderConfig(
        split="eval", global_batch_size=micro, micro_batch_size=micro, rank=0, world_size=1,
        seed=seed, masking=masking or MaskingConfig(), verify_sha256=False, max_samples=samples))
    with torch.no_grad():
        for b in loader:
            out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                        b["masked_positions"])
            p = pretraining_loss(out, b["masked_labels"], b["next_sentence_label"])
            sums += torch.stack([x.double() for x in (p.mlm * p.mlm_count, p.mlm_correct,
                                                      p.mlm_count, p.nsp * p.nsp_count,
                                                      p.nsp_correct, p.nsp_count)])
    mlm, mlm_ok, mlm_n, nsp, nsp_ok, nsp_n = sums.tolist()
    return {"mlm_loss": mlm / mlm_n, "mlm_acc": mlm_ok / mlm_n, "nsp_loss": nsp / nsp_n,
            "nsp_acc": nsp_ok / nsp_n}


# ------------------------------------------------------------------ the runs the tests share

WS1 = ("train.global_batch_size=16", "train.steps=30", "checkpoint.every=5", "eval.every=15")
WS2 = ("train.steps=8", "checkpoint.every=4", "eval.every=4", "eval.at_start=false")
BF16 = ("train.deepspeed=\"zero2_bf16\"", "train.global_batch_size=8", "train.steps=6",
        "checkpoint.every=3", "eval.every=0", "eval.at_start=false", "eval.samples=32")
BF16_RTOL = 1e-3  # stated tolerance for bf16 resume (observed: identical on this CPU)


@pytest.fixture(scope="session")
def manifest(shared_data, tmp_path_factory) -> Path:
    return cached("wiki", lambda: prepare_wiki(shared_data, tmp_path_factory.mktemp("wiki")))


@pytest.fixture(scope="session")
def ws1_runs(manifest, tmp_path_factory) -> tuple[Path, Path]:
    def build():
        base = tmp_path_factory.mktemp("ws1")
        straight, resumed = base / "straight", base / "resumed"
        pretrain(straight, manifest, 1, *WS1)
        pretrain(resumed, manifest, 1, *WS1, extra=("--stop-at-step", "15"))
        from bertscale.training.checkpoint.layout import STATE_FILE, latest_committed
        latest = latest_committed(resumed)
        assert latest.step == 15
        # The resume reads this checkpoint as one written before the trainer state was laid out
        # by component (format 1: counters, the position as the top-level consumed_samples and
        # the run's identity side by side), so the exact-resume test also proves old
        # checkpoints continue the same stream. The 2-rank resumes (preemption,
        # test_resume_matrix) read the current form.
        state_file = latest.path / STATE_FILE
        state = json.loads(state_file.read_text())
        assert state["format"] == 2 and state["components"]["data"]["consumed_samples"] == 15 * 16
        old = {**state["run"], **state["components"]["train"], "world_size": 1, "format": 1,
               "consumed_samples": state["components"]["data"]["consumed_samples"]}
        state_file.write_text(json.dumps(old))
        pretrain(resumed, manifest, 1, *WS1)
        return straight, resumed
    return cached("ws1", build)


@pytest.fixture(scope="session")
def ws2_straight(manifest, tmp_path_factory) -> Path:
    def build():
        run = tmp_path_factory.mktemp("ws2") / "zero2"
        pretrain(run, manifest, 2, *WS2)
        return run
    return cached("ws2", build)


@pytest.fixture(scope="session")
def zero_runs(manifest, tmp_path_factory) -> dict[int, Path]:
    def build():
        base = tmp_path_factory.mktemp("zero")
        runs = {}
        for stage in (1, 3):
            runs[stage] = base / f"zero{stage}"
            # Same recipe (and LR schedule) as the ZeRO-2 run, stopped after 4 of its 8 steps.
            pretrain(runs[stage], manifest, 2, *WS2, f"train.deepspeed=\"zero{stage}_fp32\"",
                     extra=("--stop-at-step", "4"))
        return runs
    return cached("zero", build)




@pytest.fixture
def two_rank_env(monkeypatch):
    """This process claims to be rank 0 of 2 with nobody listening: reaching the process group
    would hang (pytest-timeout fails the test), so any error it sees came before it."""
    from launch import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
