"""A damaged checkpoint and a full disk outside pretraining's own save, through the commands
(issue 22 items 9 and 10), on a real committed checkpoint of a real 1-rank ZeRO-3 run:

- a checkpoint file cut short (`truncate -s 5000` of its `zero_pp_rank_0_*_model_states.pt`):
  `export`, `finetune` and `embed` each stop with exit 2 and one line naming that file. Before
  the fix each printed a traceback (`OSError: [Errno 22] Invalid argument` from torch's zip
  reader inside `checkpoint.load_consolidated`);
- a full disk (a real, small tmpfs): `export` (safetensors), `finetune --checkpoint-every`
  (the run's committed checkpoints) and `prepare` (spools and shards) each stop with exit 2 and
  one line saying what there is no room for, and leave what was there intact: no partial export
  folder, the previous checkpoint still committed and resumable, and a prepare re-run after
  freeing space that gives the shards of an uninterrupted one. Before the fix each printed a
  traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from disk import fill, tmpfs
from pretrain_runs import manifest, pretrain  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_run(manifest, tmp_path_factory) -> Path:
    """2 steps of tiny_ci on one rank under ZeRO-3: one committed checkpoint (step 2)."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    pretrain(run, manifest, 1, "train.steps=2", "schedule.warmup=1", "checkpoint.every=0",
             "eval.every=0", "eval.at_start=false", "train.global_batch_size=8",
             "train.micro_batch_size=8", 'train.deepspeed="zero3_fp32"')
    return run


def bertscale(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bertscale.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_line_error(proc: subprocess.Popen, command: str, *needles: str) -> str:
    """The command's exit 2 and its one error line (a warning or two may come before it)."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith(f"bertscale {command}: error:")]
    assert len(errors) == 1, err[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def finetune_args(shared_data: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "glue", "--task", "RTE", "--data-dir", str(shared_data / "glue" / "RTE"),
            "--checkpoint", str(checkpoint), "--output-dir", str(out), "--max-train-samples", "16",
            "--max-eval-samples", "8", "--batch-size", "8", "--max-seq-length", "32", "--no-test",
            "--lr", "2e-5", "--log-every", "1", *extra]


def test_a_damaged_checkpoint_is_one_line_in_export_finetune_and_embed(zero3_run, shared_data,
                                                                       tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    (damaged,) = (run / "checkpoints" / "step_2").glob("zero_pp_rank_0_*_model_states.pt")
    subprocess.run(["truncate", "-s", "5000", str(damaged)], check=True)
    (tmp_path / "text.txt").write_text("The cat sat on the mat.\nA second sentence.\n")
    procs = {
        "export": bertscale("export", "--from", str(run), "--to", str(tmp_path / "hf"),
                            cwd=tmp_path),
        "finetune": bertscale(*finetune_args(shared_data, run, tmp_path / "ft", "--max-steps", "1"),
                              cwd=tmp_path),
        "embed": bertscale("embed", "--checkpoint", str(run), "--input",
                           str(tmp_path / "text.txt"), "--output-dir", str(tmp_path / "feats"),
                           cwd=tmp_path),
    }
    for command, proc in procs.items():
        line = one_line_error(proc, command, str(damaged), "cannot be read", "damaged")
        print(line)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "feats").exists()


@pytest.mark.timeout(1200)
def test_a_full_disk_is_one_line_in_export_finetune_and_prepare(zero3_run, manifest, shared_data,
                                                                tmp_path):
    with tmpfs(tmp_path, "160m") as disk:
        # export: the tiny model's safetensors (~18 MB) does not fit in 2 MB.
        fill(disk, 2 << 20)
        line = one_line_error(bertscale("export", "--from", str(zero3_run), "--to",
                                        str(disk / "hf"), cwd=tmp_path), "export",
                              str(disk / "hf"), "disk is full")
        print(line)
        assert sorted(p.name for p in disk.iterdir()) == [".filler"], "nothing half-written left"

        # finetune --checkpoint-every 1: room for one checkpoint (~53 MB) and half another, so
        # the first save commits and the second is refused (the core's free-space check).
        fill(disk, 80 << 20)
        out = disk / "ft"
        folder = out / "RTE" / "runs" / "lr2e-05-seed1"
        line = one_line_error(bertscale(*finetune_args(shared_data, zero3_run, out, "--max-steps",
                                                       "3", "--checkpoint-every", "1"),
                                        cwd=tmp_path), "finetune",
                              str(folder / "checkpoints"), "free, about", "are needed")
        print(line)
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_1"]
        assert (folder / "checkpoints" / "step_1" / "commit.json").is_file()
        assert [p for p in folder.rglob("*") if ".tmp" in p.name] == []
        (disk / ".filler").unlink()
        resumed = bertscale(*finetune_args(shared_data, zero3_run, out, "--max-steps", "3",
                                           "--checkpoint-every", "1"), cwd=tmp_path)
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-3000:]
        assert "resuming from the step-1 checkpoint" in err, err[-3000:]
        shutil.rmtree(out)

        # prepare: the spools and shards of one Wikipedia file (~3 MB) do not fit in 1 MB.
        fill(disk, 1 << 20)
        args = ["prepare", str(shared_data / "wikipedia" / "wiki_00.gz"), "--vocab",
                str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"), "--seq-len", "128",
                "--samples-per-shard", "1000", "--progress", "none"]
        line = one_line_error(bertscale(*args, "--out", str(disk / "shards"), cwd=tmp_path),
                              "prepare", str(disk / "shards"), "disk is full")
        print(line)
        (disk / ".filler").unlink()
        again = bertscale(*args, "--out", str(disk / "shards"), cwd=tmp_path)
        reference = bertscale(*args, "--out", str(tmp_path / "reference"), cwd=tmp_path)
        for proc in (again, reference):
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        shards = json.loads((disk / "shards" / "seq128" / "manifest.json").read_text())["shards"]
        expected = json.loads((tmp_path / "reference" / "seq128" / "manifest.json").read_text())
        assert shards == expected["shards"]
