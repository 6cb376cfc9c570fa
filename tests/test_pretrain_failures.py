"""What `bertscale pretrain` does when the data or the disk fails it mid-run (DESIGN guarantee 7),
through the command itself on 2 real ranks and real Wikipedia shards:

- a damaged sample met mid-run (shard hashes not checked at start, as docs/data.md allows for
  large known-good corpora) stops EVERY rank at the same step with exit 2 and the same one line
  naming shard, sample and global position; no traceback; the checkpoint before it stays
  committed. Both with the loader in the training process and in a DataLoader worker;
- a manifest whose sample counts do not match its shards is refused at start, naming the shard;
- a full disk (a real, small tmpfs): the free-space check before a save, a write that fails anyway
  (check off), and a universal conversion that would not fit each stop every rank with exit 2 and
  one line naming the folder, the space free and needed; the previous committed checkpoint stays
  whole (its weights load).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bertscale.training.checkpoint import layout as ckpt_lib
from bertscale.training.checkpoint.consolidated import load_consolidated
from disk import tmpfs
from pretrain_runs import (WS2, last_error_line, manifest, pretrain,  # noqa: F401
                          same_error_line, train_losses)

pytestmark = pytest.mark.slow

SMALL = ("train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=4",
         "checkpoint.every=2", "eval.every=0", "eval.at_start=false")


def _copy_data(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def _corrupt_sample_at(manifest: Path, position: int) -> tuple[str, int]:
    """Flip one payload byte of the train sample at global position `position` (the sample's
    size stays, its CRC no longer matches). Uses the loader's own position -> (shard, offset) map
    and the shard index to find the bytes; the command cannot say where a sample lives."""
    import numpy as np

    from bertscale.data.loader import LoaderConfig, open_loader
    from bertscale.data.shards import HEADER, ShardFile, index_tar, read_manifest

    m = read_manifest(manifest)
    loader = open_loader(m, LoaderConfig(split="train", global_batch_size=8, micro_batch_size=2,
                                         rank=0, world_size=1, seed=1234, verify_sha256=False))
    shard, offset = (int(x[0]) for x in loader.order.locate(np.array([position])))
    path = Path(m.shard_location("train", shard))
    f = ShardFile(path)
    start = int(index_tar(f, "train", shard, m.shards["train"][shard].samples).starts[offset])
    f.close()
    raw = bytearray(path.read_bytes())
    raw[start + HEADER.size + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    return m.shards["train"][shard].name, offset


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_sample_mid_run_stops_every_rank_with_one_line(manifest, tmp_path, workers):
    data = _copy_data(manifest, tmp_path / "data")
    position = 2 * 8 + 4 + 1      # step 3, inside rank 1's half of the global batch of 8
    shard, offset = _corrupt_sample_at(data, position)
    run = tmp_path / "run"
    # Logged (and read back) at steps 1 and 4 only: rank 1 meets the damage at step 3 and steps
    # on zero-weighted stand-ins until the read at step 4 (the save step) stops every rank,
    # naming step 3, before anything is saved.
    results = pretrain(run, data, 2, *SMALL, "data.verify_sha256=false", "logging.every=4",
                       f"data.num_workers={workers}", check=False)
    same_error_line(results, "step 3:", f"shard {shard}", f"sample {offset} ",
                             f"(global position {position})", "checksum mismatch",
                             "(found by rank 1)")
    assert sorted(train_losses(run)) == [1]
    assert ckpt_lib.latest_committed(run).step == 2
    assert not (run / "checkpoints" / "step_4").exists()


def test_shards_cut_short_under_a_running_job_stop_every_rank_with_one_line(manifest, tmp_path):
    """What `cp new/* data/` or `rsync --inplace` does to shards a job is reading: the files are
    cut short (then rewritten) under it. Every rank stops at the same step with exit 2 and one
    line naming a shard, as for a damaged sample; the checkpoint before stays committed. Before
    the fix the shards were memory-mapped and every rank died of SIGBUS on the next read past
    the new end (exit -7; "Bus error", 135, in a shell)."""
    import time

    from launch import RankResult, start_ranks
    from pretrain_runs import pretrain_argv

    data = _copy_data(manifest, tmp_path / "data")
    run = tmp_path / "run"
    logs = [(tmp_path / f"rank{r}.out", tmp_path / f"rank{r}.err") for r in range(2)]
    procs = start_ranks(pretrain_argv(run, data, "train.global_batch_size=8",
                                      "train.micro_batch_size=2", "train.steps=400",
                                      "checkpoint.every=2", "eval.every=0", "eval.at_start=false",
                                      "schedule.warmup=1", "data.verify_sha256=false"),
                        2, stdout=lambda r: open(logs[r][0], "w"),
                        stderr=lambda r: open(logs[r][1], "w"))
    try:
        deadline = time.monotonic() + 400
        while "checkpoint step 2 committed" not in logs[0][0].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                logs[0][1].read_text()[-3000:]
            time.sleep(0.1)
        for shard in data.parent.glob("train-*.tar"):    # what `cp` does first: O_TRUNC
            os.truncate(shard, shard.stat().st_size // 5)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [RankResult(r, c, logs[r][0].read_text(), logs[r][1].read_text())
               for r, c in enumerate(codes)]
    same_error_line(results, "shard train-", "bytes now, ", "cut short")
    assert ckpt_lib.latest_committed(run).step >= 2


def test_a_manifest_whose_sample_counts_are_wrong_is_refused_at_start(manifest, tmp_path):
    data = _copy_data(manifest, tmp_path / "data")
    raw = json.loads(data.read_text())
    shard = raw["shards"]["train"][1]
    shard["samples"] -= 1
    data.write_text(json.dumps(raw))
    results = pretrain(tmp_path / "run", data, 2, *SMALL, "data.verify_sha256=false", check=False)
    same_error_line(results, f"shard {shard['name']} is listed with {shard['samples']} "
                                      f"samples", f"holds {shard['samples'] + 1}",
                             "(found by rank 1)")
    assert ckpt_lib.latest_committed(tmp_path / "run") is None


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 MB filesystem: room for one checkpoint of this run (about 70 MB), not two."""
    with tmpfs(tmp_path, "100m") as mount:
        yield mount


@pytest.mark.timeout(1200)
def test_a_full_disk_stops_every_rank_with_one_line_and_keeps_the_checkpoint(manifest, small_disk,
                                                                          tmp_path):
    # The check before the save: step 2 fits, step 4 would not.
    run = small_disk / "checked"
    results = pretrain(run, manifest, 2, *SMALL, check=False)
    line = same_error_line(results, "checkpoint step 4:", str(run / "checkpoints"),
                                    "free, about", "are needed")
    assert "The newest committed checkpoint, step 2" in line and "is intact" in line
    assert ckpt_lib.latest_committed(run).step == 2
    assert not (run / "checkpoints" / "step_4").exists()

    # A universal conversion (resume on 1 rank) needs room for the copy: refused before writing.
    results1 = pretrain(run, manifest, 1, *SMALL, check=False)
    assert results1[0].returncode == 2, results1[0].stderr[-2000:]
    assert "Traceback" not in results1[0].stderr
    assert "for a resume on another number of ranks" in last_error_line(results1[0].stderr)
    assert not [p for p in (run / "checkpoints").iterdir() if "universal" in p.name]

    # What the weights of the surviving checkpoint are: complete (DeepSpeed's consolidation reads
    # every partition). The CLI has no command that only reads a checkpoint, hence the library.
    weights = load_consolidated(run)
    assert weights.step == 2 and len(weights.state_dict) > 30
    del weights          # its tensors may map the files: deleted, they would still hold the space
    gc.collect()
    shutil.rmtree(run)
    assert shutil.disk_usage(small_disk).free > 95e6

    # No check: the write itself fails on the full disk; same message, partial files removed.
    run = small_disk / "unchecked"
    results = pretrain(run, manifest, 2, *SMALL, "checkpoint.check_free_space=false", check=False)
    line = same_error_line(results, "checkpoint step 4: writing", "failed (",
                                    "free there", "a checkpoint needs about")
    assert "The newest committed checkpoint, step 2" in line
    assert [c.step for c in ckpt_lib.list_committed(run)] == [2]
    assert not (run / "checkpoints" / "step_4").exists()
    assert load_consolidated(run).step == 2
    assert os.statvfs(small_disk).f_bfree > 0


@pytest.mark.timeout(900)
def test_check_free_space_false_also_lets_a_universal_conversion_try(manifest, small_disk):
    """checkpoint.check_free_space = false skips the free-space check of the universal
    conversion too, not only the save's: a 1-rank run commits step 2 on a 100 MB disk (room for
    one checkpoint), then resumes on 2 ranks, which needs a universal copy. With the check off
    the conversion runs, the full disk stops its write, and every rank says so in the same one
    line; no temporary folder is left and the checkpoint is intact.

    Failed before the fix: the resume was refused by the up-front check ("... for a resume on
    another number of ranks: ... free, about ... are needed") although the recipe turned the
    check off."""
    run = small_disk / "run"
    pretrain(run, manifest, 1, *SMALL, "train.steps=2", "schedule.warmup=1")
    assert ckpt_lib.latest_committed(run).step == 2
    results = pretrain(run, manifest, 2, *SMALL, "checkpoint.check_free_space=false", check=False)
    line = same_error_line(results, "writing the universal copy failed",
                                    "The checkpoint itself is intact")
    assert re.search(r" \d+(\.\d)? K?B free in ", line), line   # the disk really was full
    assert sorted(p.name for p in (run / "checkpoints").iterdir()
                  if p.is_dir()) == ["step_2"], list((run / "checkpoints").iterdir())
    assert load_consolidated(run).step == 2


@pytest.mark.timeout(1200)
def test_a_full_disk_while_appending_metrics_loses_no_record_and_a_resume_records_each_step_once(
        manifest, tmp_path):
    """metrics.jsonl on a real tmpfs that fills up mid-run (issue 22 item 4). The disk is filled
    just when the next record cannot fit in the file's last page, so that record's write fails
    part-way; it is freed again once the trainer has said so. The run trains on, says it once,
    and writes the held records when space returns: every step 1..14 is recorded once, in whole
    lines, and the step-12 checkpoint is committed; the run then stops at step 15 on the debug
    NaN (exit 3), leaving records past its checkpoint. A torn last line, as a writer killed
    mid-record leaves it (the command cannot produce one on demand), is appended; the resumed
    run cuts it, drops the records of the steps it repeats and records 13..16 once.

    Before the fix the failed write was a traceback from reporting.py (exit 1) that left half a
    line in the file; a resume appended onto a torn line (the file no longer parsed) and left
    pretraining's repeated steps recorded twice."""
    import signal
    import time

    from disk import fill
    from launch import start_ranks
    from pretrain_runs import pretrain_argv

    sets = ("train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=16",
            "checkpoint.every=12", "eval.every=0", "eval.at_start=false", "schedule.warmup=1",
            "data.verify_sha256=false", "logging.every=1")
    with tmpfs(tmp_path, "200m") as disk:
        run, out, err = disk / "run", tmp_path / "a.out", tmp_path / "a.err"
        metrics = run / "metrics.jsonl"
        (proc,) = start_ranks(pretrain_argv(run, manifest, *sets, "debug.nan_loss_at_step=15"), 1,
                              stdout=lambda r: open(out, "w"), stderr=lambda r: open(err, "w"))
        try:
            filled = freed = False
            shortest = 10**6
            deadline = time.monotonic() + 600
            while proc.poll() is None and not freed:
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.02)
                if not filled and metrics.is_file() and metrics.stat().st_size:
                    proc.send_signal(signal.SIGSTOP)
                    lines = metrics.read_bytes().splitlines(keepends=True)
                    shortest = min(shortest, *map(len, lines))
                    st = metrics.stat()
                    if st.st_blocks * 512 - st.st_size < shortest:  # the next record won't fit
                        fill(disk, 0)
                        filled = True
                        filled_at = len(lines)
                    proc.send_signal(signal.SIGCONT)
                elif filled and "cannot append" in err.read_text():
                    proc.send_signal(signal.SIGSTOP)
                    (disk / ".filler").unlink()
                    freed = True
                    proc.send_signal(signal.SIGCONT)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = err.read_text()
        assert filled and freed, text[-3000:]
        assert rc == 3, text[-3000:]     # the debug NaN at step 15: nothing to do with the disk
        assert "Traceback" not in text, text[-3000:]
        warnings = [line for line in text.splitlines() if str(metrics) in line]
        assert len(warnings) == 2, warnings
        assert "cannot append (the disk is full" in warnings[0] and "training goes on" in warnings[0]
        assert "written again" in warnings[1]
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 15))
        assert filled_at < 12, "the disk was full before the checkpoint, not after"
        assert ckpt_lib.latest_committed(run).step == 12

        with open(metrics, "a") as f:
            f.write('{"kind": "train", "step": 15, "lo')
        resumed = pretrain(run, manifest, 1, *sets)[0]
        assert "cut a torn last line" in resumed.stderr
        assert "resumed from" in resumed.stdout
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        steps = [r["step"] for r in records if r["kind"] == "train"]
        assert steps == list(range(1, 17)), steps
        # The records of 13 and 14 are the resumed run's (written after the first run's).
        assert records[12]["time"] > records[11]["time"] + 1
