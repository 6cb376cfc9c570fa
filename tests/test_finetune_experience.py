"""What a user sees and keeps from `bertscale finetune`: the progress bar on a real terminal
(a pseudo-terminal of a set size), metrics.jsonl / W&B (offline) / TensorBoard per run, the
lr x seed table, re-scoring and predicting with a saved model, `bertscale.from_pretrained`, and
resumable grids (a killed run continues from its checkpoint to the same result; finished runs are
skipped; an output folder of other settings is refused). Real GLUE MRPC text throughout."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from finetune_helpers import finetune_cli, tiny_hf_checkpoint

COLUMNS = 72


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    for var in ("RANK", "WORLD_SIZE", "COLUMNS", "WANDB_MODE", "WANDB_API_KEY"):
        env.pop(var, None)
    return env


def _in_pty(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `python -m bertscale.cli argv` with stdout and stderr on a pseudo-terminal of
    COLUMNS x 24; returns (exit status, everything the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "bertscale.cli", *argv], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:       # EIO: the child side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def pty_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, minilm_dir: Path):
    """One grid (1 lr x 2 seeds, 3 steps each) of a tiny random BERT on 16 real MRPC pairs,
    with every reporting sink on, through a pseudo-terminal."""
    root = tmp_path_factory.mktemp("pty-run")
    ckpt = tiny_hf_checkpoint(root / "ckpt", minilm_dir / "vocab.txt")
    rc, screen = _in_pty(
        ["finetune", "glue", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
         "--checkpoint", str(ckpt), "--output-dir", str(root / "out"), "--lr", "1e-4",
         "--seeds", "1,2", "--max-steps", "3", "--batch-size", "4", "--max-train-samples", "16",
         "--max-eval-samples", "24", "--eval-batch-size", "4", "--log-every", "1", "--no-test",
         "--save-model", "--wandb", "--tensorboard"], root, _env())
    assert rc == 0, screen[-3000:]
    return root, screen


def test_progress_bar_fits_the_terminal_and_every_sink_gets_every_step(pty_run) -> None:
    """On a 72-column terminal: every redraw of the bar (training, and each dev prediction pass)
    is at most 71 columns (so it never wraps), with a bar and an ETA; one line per run and pass
    closes it. metrics.jsonl has one record per training step plus the dev metrics; W&B wrote an
    offline run (no API key here); TensorBoard's event file holds the same 3 losses; the table
    shows mean ± std over the two seeds."""
    root, screen = pty_run
    segments = [s.replace("\x1b[K", "") for s in re.split(r"[\r\n]", screen)]
    train = [s for s in segments if " train " in s and " ETA " in s]
    assert len(train) >= 6 and all(re.search(r"ETA (--:--|\d+:\d\d)$", s) for s in train), train
    assert any(" loss 0." in s for s in train), train    # the bar gave way to the loss
    bars = [s for s in segments if " dev.tsv [" in s and "#" in s and " ETA " in s]
    assert len(bars) >= 6, screen
    too_wide = [s for s in segments if " ETA " in s and len(s) > COLUMNS - 1]   # the redraws
    assert not too_wide, too_wide
    assert screen.count("train 3/3 steps in ") == 2
    assert screen.count("dev.tsv 6/6 batches in ") == 2
    assert "± " in screen and re.search(r"^\*\s+0\.0001\s", screen, re.M), screen

    task = root / "out" / "MRPC"
    results = json.loads((task / "results.json").read_text())
    for run in results["runs"]:
        folder = task / "runs" / run["folder"]
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]
        assert train[-1]["loss"] == run["train_loss_last_step"]
        assert math.isclose(sum(r["loss"] for r in train) / 3, run["train_loss_last20_mean"])
        (dev,) = [r for r in records if r["kind"] == "eval"]
        assert dev["f1"] == run["metrics"]["f1"] and dev["step"] == 3
        assert list((folder / "wandb").glob("offline-run-*")), "no offline W&B run"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(folder / "tensorboard"))
        events.Reload()
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
            [r["loss"] for r in train])


def test_eval_only_and_predict_reproduce_the_run(pty_run, tmp_path: Path, shared_data: Path) -> None:
    """`finetune glue --eval-only` on the best run's saved model gives the run's own dev metrics
    exactly and the same dev prediction file; `finetune predict` writes the GLUE submission
    format for new pairs. The loader `bertscale.from_pretrained` (the library call, the one the
    commands use) rebuilds the saved head with its task: its argmax is the written prediction."""
    import torch

    import bertscale
    from bertscale.errors import UserError
    from bertscale.finetune import glue

    root, _ = pty_run
    task = root / "out" / "MRPC"
    results = json.loads((task / "results.json").read_text())
    best = task / "runs" / f"lr{results['best_lr']:g}-seed{results['best_seed']}"
    model_dir = best / "model"
    saved = json.loads((model_dir / "bertscale_task.json").read_text())
    assert saved["task"] == "MRPC" and saved["labels"] == ["0", "1"] and saved["max_seq_length"] == 128
    rc = finetune_cli(["finetune", "glue", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
                       "--checkpoint", str(model_dir), "--output-dir", str(tmp_path / "eval"),
                       "--eval-only", "--max-eval-samples", "24", "--no-test"])
    assert rc == 0
    again = json.loads((tmp_path / "eval" / "MRPC" / "results.json").read_text())
    run = [r for r in results["runs"] if r["seed"] == results["best_seed"]][0]
    assert again["metrics"] == run["metrics"]
    assert (tmp_path / "eval" / "MRPC" / "dev_predictions.tsv").read_bytes() == \
        (best / "dev_predictions.tsv").read_bytes()

    with pytest.raises(UserError, match="holds the results of a fine-tuning grid"):
        finetune_cli(["finetune", "glue", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
                      "--checkpoint", str(model_dir), "--output-dir", str(root / "out"),
                      "--eval-only", "--no-test"])
    lines = (shared_data / "glue" / "MRPC" / "test.tsv").read_text(encoding="utf-8-sig").splitlines()
    new = tmp_path / "new.tsv"
    new.write_text("\n".join(lines[:21]) + "\n", encoding="utf-8")
    out = tmp_path / "pred" / "MRPC.tsv"
    assert finetune_cli(["finetune", "predict", "--checkpoint", str(model_dir), "--input",
                         str(new), "--output", str(out)]) == 0
    rows = [r.split("\t") for r in out.read_text().splitlines()]
    assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [str(i) for i in range(20)]

    model = bertscale.from_pretrained(model_dir)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    tok = bertscale.tokenizer_for(model_dir, max_length=128)
    examples = glue.read_tsv(new, glue.TASKS["MRPC"], glue.TASKS["MRPC"].test, labelled=False)
    for e, row in zip(examples, rows[1:]):
        enc = tok.encode(e.text_a, e.text_b)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.ids]),
                           token_type_ids=torch.tensor([enc.type_ids]),
                           attention_mask=torch.ones(1, len(enc.ids), dtype=torch.long))
        assert str(int(logits.argmax(-1))) == row[1]


def test_from_pretrained_builds_any_head_from_a_hugging_face_folder(minilm_dir: Path) -> None:
    """The library loader (no command shows it): a fresh head on real weights, encoder equal to
    the checkpoint's; an unknown head and a missing num_labels are clear errors."""
    import torch

    import bertscale
    from bertscale.errors import UserError
    from bertscale.pretrained import load_checkpoint

    model = bertscale.from_pretrained(minilm_dir, head="sequence-classification", num_labels=3)
    assert model.classifier.out_features == 3
    ref = load_checkpoint(minilm_dir).state_dict
    got = model.state_dict()
    assert torch.equal(got["bert.encoder.layer.5.output.dense.weight"],
                       ref["bert.encoder.layer.5.output.dense.weight"])
    assert type(bertscale.from_pretrained(minilm_dir, head="encoder")).__name__ == "BertModel"
    with pytest.raises(UserError, match="unknown head 'sentiment'"):
        bertscale.from_pretrained(minilm_dir, head="sentiment")
    with pytest.raises(UserError, match="needs num_labels"):
        bertscale.from_pretrained(minilm_dir, head="token-classification")


def _bertscale(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bertscale.cli", *argv], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path: Path, shared_data: Path,
                                               minilm_no_dropout: Path) -> None:
    """Real MiniLM weights with dropout off, 8 steps, a committed checkpoint every 2: a run
    SIGKILLed right after its first checkpoint and started again continues from it and
    ends with the same dev metrics and losses as a run never interrupted. Then the finished grid
    is skipped on a re-run, and the same folder with another setting is refused, naming it.
    One seed: the console shows no spread."""
    args = ["finetune", "glue", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
            "--checkpoint", str(minilm_no_dropout), "--lr", "5e-5", "--max-steps", "8",
            "--batch-size", "4", "--max-train-samples", "32", "--max-eval-samples", "32",
            "--max-seq-length", "64", "--no-test", "--checkpoint-every", "2", "--log-every", "1"]
    straight = _bertscale([*args, "--output-dir", str(tmp_path / "a")], tmp_path)
    out_a, err_a = straight.communicate(timeout=600)
    assert straight.returncode == 0, err_a[-3000:]
    assert "±" not in out_a and "(1 seed, lr 5e-05" in out_a
    assert "32 examples, 8 steps (--max-steps; 3 epochs would be 24), batch 4" in err_a

    run_dir = tmp_path / "b" / "MRPC" / "runs" / "lr5e-05-seed1"
    victim = _bertscale([*args, "--output-dir", str(tmp_path / "b")], tmp_path)
    deadline = time.monotonic() + 600
    while not list((run_dir / "checkpoints").glob("step_*/commit.json")):
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert not (run_dir / "results.json").exists(), "killed too late: the run had finished"

    resumed = _bertscale([*args, "--output-dir", str(tmp_path / "b")], tmp_path)
    out_b, err_b = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err_b[-3000:]
    step = int(re.search(r"resuming from the step-(\d+) checkpoint", err_b).group(1))
    assert 2 <= step < 8
    a = json.loads((tmp_path / "a" / "MRPC" / "results.json").read_text())["runs"][0]
    b = json.loads((tmp_path / "b" / "MRPC" / "results.json").read_text())["runs"][0]
    assert b["train_resumed_from_step"] == step
    assert b["metrics"] == a["metrics"]
    assert math.isclose(b["train_loss_last_step"], a["train_loss_last_step"], rel_tol=1e-5)
    assert math.isclose(b["train_loss_last20_mean"], a["train_loss_last20_mean"], rel_tol=1e-5)
    assert not (run_dir / "checkpoints").exists(), "a finished run keeps no checkpoint"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    straight_records = [json.loads(line) for line in
                        (tmp_path / "a" / "MRPC" / "runs" / "lr5e-05-seed1" / "metrics.jsonl")
                        .read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["loss"] for r in records if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in straight_records if r["kind"] == "train"], rel=1e-5)

    again = _bertscale([*args, "--output-dir", str(tmp_path / "b")], tmp_path)
    _, err_c = again.communicate(timeout=600)
    assert again.returncode == 0 and "finished earlier" in err_c and " train " not in err_c

    other = _bertscale([*args, "--max-steps", "6", "--output-dir", str(tmp_path / "b")], tmp_path)
    _, err_d = other.communicate(timeout=600)
    assert other.returncode == 2, err_d[-2000:]
    assert "holds results of other settings" in err_d and "max_steps: 8 there, 6 now" in err_d
    assert "Traceback" not in err_d


def test_every_finetune_flag_has_help_and_says_its_default() -> None:
    """The parsers `bertscale finetune TASK --help` prints: every flag explains itself and names
    its default; --lr gives the actual grid (the GLUE default is 4 runs per seed)."""
    import argparse

    from bertscale.commands.finetune import register
    parser = argparse.ArgumentParser(prog="bertscale")
    register(parser.add_subparsers(dest="command"))
    finetune = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["finetune"]
    tasks = next(a for a in finetune._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(tasks) == {"glue", "squad", "swag", "ner", "predict"}
    for name, p in tasks.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = f"finetune {name} {action.option_strings[0]}"
            assert action.help, f"{flag} has no help text"
            if action.default not in (None, False, True, argparse.SUPPRESS):
                assert "default" in action.help, f"{flag}: help names no default"
    lr = {n: next(a for a in p._actions if "--lr" in a.option_strings).help
          for n, p in tasks.items() if n != "predict"}
    assert "5e-5,4e-5,3e-5,2e-5: 4 runs per seed" in lr["glue"]
    assert "5e-5 (v1.1), 5e-5 (v2.0)" in lr["squad"] and "1e-3 (--mode feature)" in lr["ner"]
