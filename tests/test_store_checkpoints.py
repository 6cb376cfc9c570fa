"""Checkpoints in an object store: `bertscale pretrain --run-dir s3://… | gs://… | az://…`, through
the command, on real text, against real store servers on 127.0.0.1 (tests/stores.py: moto's S3,
gcp-storage-emulator, Azurite).

What runs on which store (suite time): every store runs the kill -9 during an upload (uploads
throttled by the server: LocalS3's or the proxy's put_bandwidth), the resume from the store's
newest commit (not the partial checkpoint), losses equal to an uninterrupted run's step by step,
and keep-K in the store. S3 does it on 2 ranks with the resume on 1 (the universal conversion)
on the same node (whose staging holds the trap: step 4 committed locally), and the lease
refusing a second trainer; GCS and Azure on one rank with the resume on a new node (an empty
staging folder: everything downloaded), which takes over the killed holder's lease. The
rank-count change and the conversion are the same code whatever the store; what differs per
store is the client (its uploads, listings, deletes, reads), which the GCS/Azure kill exercises.

Before this work `--run-dir s3://bucket/run` trained into a local folder named `s3:/bucket/run`
(argparse made it a Path, which folds "//"); `test_bad_store_locations_stop_with_one_line`'s
first check failed that way (a local `s3:` folder appeared, the store stayed empty).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import free_port, run_ranks
from pretrain_runs import (manifest, pretrain_argv, same_error_line,  # noqa: F401
                          train_losses)

pytestmark = pytest.mark.slow

STEPS = 6
BASE = (f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
        "schedule.warmup=1", "checkpoint.every=2", "checkpoint.keep=2", "eval.every=0",
        "eval.at_start=false", "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0", "data.verify_sha256=false")
RTOL = 2e-5  # as tests/test_resume_matrix.py: same samples, only the order of sums differs
UP_RATE = 16e6  # bytes/s of uploads in the GCS/Azure kill test: one rank's 71 MB take ~4.5 s


def torchrun(nproc: int, argv: list[str], *, staging: Path, log: Path, cwd: Path,
             ) -> subprocess.Popen:
    """`torchrun --nproc-per-node N -m bertscale.pretrain …`, output to `log`."""
    env = {**os.environ, "BERTSCALE_STAGING_DIR": str(staging), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *argv]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of the job: torchrun and its workers (which torchrun starts in sessions of
    their own, so a process-group kill would miss them), all found first, then killed."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n"
                                 f"{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout}s:\n{log.read_text()[-4000:]}")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def store_losses(store, run: str) -> dict[int, float]:
    """Step -> loss from the metrics.jsonl the run put in the store (later records win)."""
    fs = store.fs()
    fs.invalidate_cache()
    lines = fs.cat_file(store.url(run, "metrics.jsonl")).decode().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def listing(store, run: str) -> list[str]:
    fs = store.fs()
    fs.invalidate_cache()
    prefix = store.key(store.url(run)) + "/"
    return sorted(p.split(prefix, 1)[1] for p in fs.find(store.url(run)))


def wait_for_object(proc: subprocess.Popen, store, run: str, prefix: str,
                    timeout: float = 120) -> None:
    """Until an object under `prefix` of the run is in the store (while `proc` runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f.startswith(prefix) for f in listing(store, run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {prefix} was in the store")
        time.sleep(0.1)
    raise AssertionError(f"nothing under {prefix} in the store within {timeout}s")


def committed(files: list[str]) -> list[int]:
    return sorted(int(f.split("/")[1][5:]) for f in files
                  if f.startswith("checkpoints/step_") and f.endswith("/commit.json"))


def check_the_resumed_run(store, reference: dict[int, float]) -> list[str]:
    """After the resume: every step's loss, from the metrics.jsonl in the store, equals the
    uninterrupted run's; keep=2 left steps 4 and 6 and pruned step 2. The store's listing."""
    losses = store_losses(store, "runs/p1")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=RTOL), step
    files = listing(store, "runs/p1")
    assert committed(files) == [4, 6]
    assert not [f for f in files if f.startswith("checkpoints/step_2")]
    return files


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: one rank, a local folder, every step's loss."""
    run = tmp_path_factory.mktemp("store-ref") / "run"
    run_ranks(pretrain_argv(run, manifest, *BASE), 1, timeout=400)
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_killed_mid_upload_resumes_on_another_rank_count_from_s3(
        store, manifest, reference, tmp_path):
    """2 ranks train into S3 (uploads slowed to 8 MB/s, so each takes seconds); a second
    trainer on the same run is refused while the first holds the lease; the job is killed -9
    while step 4 uploads, after step 2 was committed. Step 4 is then in the store in part and
    committed only in the node's staging folder. A 1-rank restart on the same node resumes from
    step 2 (the store's newest commit, not the local one), converts 2 -> 1 ranks, re-uploads
    step 4 over the leftovers, and every step's loss (steps 1-2 of the killed run, 3-6 of the
    resume, read from the metrics.jsonl in the bucket) equals the uninterrupted run's. keep=2
    leaves steps 4 and 6 in the store."""
    staging = tmp_path / "staging"
    url = store.url("runs", "p1")
    argv = pretrain_argv(url, manifest, *BASE)  # torchrun takes "-m bertscale.pretrain …"
    store.server.put_bandwidth = 8e6
    log_a = tmp_path / "a.log"
    job = torchrun(2, argv, staging=staging, log=log_a, cwd=tmp_path)
    try:
        wait_for_line(job, log_a, "step 1/")
        # The lease: a second trainer (another node's staging) stops before touching anything.
        second = run_ranks(pretrain_argv(url, manifest, *BASE), 1, check=False, timeout=200,
                           env={"BERTSCALE_STAGING_DIR": str(tmp_path / "other")})
        assert second[0].returncode == 2, second[0].stderr[-2000:]
        lines = [s for s in second[0].stderr.splitlines() if s.strip()]
        assert len(lines) == 1 and url in lines[0] and "another `bertscale pretrain`" in lines[0]
        wait_for_line(job, log_a, "checkpoint step 4: the loop stalled")
        # Killed once part of step 4 is in the store (a fixed pause could land before the
        # first object is listed, or after the commit on a faster machine).
        wait_for_object(job, store, "runs/p1", "checkpoints/step_4/")
    finally:
        kill_job(job)
        job.wait(timeout=30)
    out_a = log_a.read_text()
    assert "checkpoint step 2 committed in " in out_a
    assert "checkpoint step 4 committed in " not in out_a
    files = listing(store, "runs/p1")
    assert committed(files) == [2]
    partial = [f for f in files if f.startswith("checkpoints/step_4/")]
    assert partial and "checkpoints/step_4/commit.json" not in partial  # a killed upload
    local = staging / next(p.name for p in staging.iterdir() if p.is_dir())
    assert (local / "checkpoints" / "step_4" / "commit.json").is_file()  # the trap

    store.server.put_bandwidth = 0.0
    log_b = tmp_path / "b.log"
    out_b = finish(torchrun(1, argv, staging=staging, log=log_b, cwd=tmp_path), log_b)
    assert "(step 2, 16 samples consumed, converted from 2 ranks through a universal " \
        "checkpoint)" in out_b, out_b[-3000:]
    assert "taking over the run lock" in out_b  # the killed holder's lease, same host
    files = check_the_resumed_run(store, reference)
    assert "lock.json" not in files and "metrics.jsonl" in files and "vocab.txt" in files
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
    # What the loop saw at each save is recorded: stall, and the previous upload's speed.
    records = [json.loads(s) for s in (local / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if r["kind"] == "checkpoint"]
    assert [r["step"] for r in saves] == [2, 4, 6] and all(r["stall_s"] >= 0 for r in saves)


@pytest.mark.parametrize("store", ["gs", "az"], indirect=True)
def test_killed_mid_upload_resumes_on_a_new_node(store, manifest, reference, tmp_path):
    """The S3 test's kill on GCS and Azure, on one rank (the rank-count change is the store's
    no more than the conversion is; S3 covers both). One rank trains into the store with
    uploads slowed to UP_RATE by the proxy (tests/stores.py, put_bandwidth: every request body,
    so GCS's and Azure's own upload protocols); it is killed -9 while step 4 uploads, after step
    2 was committed: step 4 is in the store in part, with no commit.json. A run on a NEW node (an
    empty staging folder) resumes from the store's newest commit, step 2, downloads it (the
    proxy counts the reads: the optimizer states), re-uploads step 4 over the leftovers, and
    every step's loss (1-2 of the killed run, 3-6 of the resume, from the metrics.jsonl in the
    store) equals the uninterrupted run's; keep=2 leaves steps 4 and 6 in the store."""
    url = store.url("runs", "p1")
    argv = pretrain_argv(url, manifest, *BASE)
    store.server.put_bandwidth = UP_RATE
    log_a = tmp_path / "a.log"
    node_a = tmp_path / "node-a"
    job = torchrun(1, argv, staging=node_a, log=log_a, cwd=tmp_path)
    try:
        wait_for_line(job, log_a, "checkpoint step 4: the loop stalled")
        # Killed once the first of step 4's files is in the store (the model states, 18 MB,
        # ~1 s at UP_RATE), while the optimizer states (53 MB) still upload.
        wait_for_object(job, store, "runs/p1", "checkpoints/step_4/")
    finally:
        kill_job(job)
        job.wait(timeout=30)
        store.server.put_bandwidth = 0.0
    out_a = log_a.read_text()
    assert "checkpoint step 2 committed in " in out_a
    assert "checkpoint step 4 committed in " not in out_a
    files = listing(store, "runs/p1")
    assert committed(files) == [2]
    partial = [f for f in files if f.startswith("checkpoints/step_4/")]
    assert partial and "checkpoints/step_4/commit.json" not in partial, files  # a killed upload
    assert not [f for f in partial if f.endswith("optim_states.pt")], partial  # cut mid-body
    local = node_a / next(p.name for p in node_a.iterdir() if p.is_dir())
    assert (local / "checkpoints" / "step_4" / "commit.json").is_file()  # on node A only

    store.server.reset_counts()
    log_b = tmp_path / "b.log"
    out_b = finish(torchrun(1, argv, staging=tmp_path / "node-b", log=log_b, cwd=tmp_path),
                   log_b)
    assert "(step 2, 16 samples consumed)" in out_b, out_b[-3000:]
    assert "taking over the run lock" in out_b  # the killed holder's lease
    fetched = {k for k, n in store.server.gets.items() if "/checkpoints/step_2/" in k and n}
    assert any(k.endswith("optim_states.pt") for k in fetched), fetched
    files = check_the_resumed_run(store, reference)
    assert "lock.json" not in files and "metrics.jsonl" in files


@pytest.mark.parametrize("store", ["gs"], indirect=True)
def test_a_denied_upload_stops_every_rank_with_one_line_and_the_rerun_resumes(
        store, manifest, reference, tmp_path):
    """Rank 1's credential loses write access mid-run (the store answers its step-4 puts with
    403, as it does to a revoked or expired credential; the proxy stands in for GCS's access
    check, tests/stores.py). Its upload fails in the background while training goes on; at the
    next save (step 6) both ranks stop: exit 2, the same one line naming the step, the store,
    the rank, the store's own reason and the newest commit (step 2), no traceback. Step 4 is
    not committed in the store and nothing of step 6 is there. With access back, the same
    command resumes from step 2 and every step's loss equals the uninterrupted run's."""
    url = store.url("runs", "p1")
    argv = pretrain_argv(url, manifest, *BASE)
    env = {"BERTSCALE_STAGING_DIR": str(tmp_path / "staging")}
    store.server.deny_writes(r"checkpoints/step_4/\S*zero_pp_rank_1_")
    try:
        results = run_ranks(argv, 2, check=False, timeout=400, env=env)
    finally:
        store.server.deny_writes(None)
    line = same_error_line(results, "storage.objects.create",
                           "The newest checkpoint committed in the store is step 2")
    # Said once, by the rank it happened to (rank 0 also learns it, to stop waiting for it).
    assert line.startswith(f"bertscale pretrain: error: checkpoint step 4: uploading to {url}/"
                           "checkpoints/step_4 failed on rank 1: access denied, check the "
                           "credentials"), line
    assert line.count("checkpoint step 4") == 1 and "(found by rank 1)" in line, line
    assert "checkpoint step 2 committed in " in results[0].stdout + results[0].stderr, line
    files = listing(store, "runs/p1")
    assert committed(files) == [2], files
    assert not [f for f in files if f.startswith("checkpoints/step_6")], files

    again = run_ranks(argv, 2, check=False, timeout=400, env=env)
    assert [r.returncode for r in again] == [0, 0], again[0].stderr[-3000:]
    assert "(step 2, 16 samples consumed)" in again[0].stdout + again[0].stderr
    check_the_resumed_run(store, reference)


def test_bad_store_locations_stop_with_one_line(store, manifest, tmp_path):
    """A bucket that does not exist, a store that cannot be reached, a scheme that is no
    store: exit 2 on every rank with one line naming the URL, and nothing written (no staging
    folder, no local folder named after the URL, nothing in the store)."""
    staging = tmp_path / "staging"
    env = {"BERTSCALE_STAGING_DIR": str(staging)}
    missing = store.prefix.replace(store.bucket, "no-such-bucket") + "/runs/p1"
    cases = [(missing, env, "there is no bucket no-such-bucket"),
             (store.url("runs", "p1"), {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
              "cannot write to the store"),
             ("http://example.invalid/runs/p1", env, "a run folder is a local path or an object-store")]
    for url, case_env, says in cases:
        results = run_ranks(pretrain_argv(url, manifest, *BASE), 2, check=False, timeout=200,
                            env=case_env, cwd=tmp_path)
        for r in results:
            lines = [s for s in r.stderr.splitlines() if s.strip()]
            assert r.returncode == 2, (url, r.stderr[-2000:])
            assert len(lines) == 1 and url in lines[0] and says in lines[0], (url, lines)
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert listing(store, "runs/p1") == []
