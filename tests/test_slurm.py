"""The project's SLURM scripts against a real SLURM controller (DESIGN guarantees 4-6).

tests/slurm_cluster.sh brings up Debian's slurmctld, munge and two slurmd (virtual nodes n1, n2 on
this machine) once per session; tests/slurm_stop.sh stops them at the end. The jobs are the
project's own `slurm/*.sbatch`, unmodified, configured only through environment variables and
sbatch options (tiny model, CPU, gloo on loopback):

- prepare.sbatch runs `bertscale prepare` as one MPI job (srun --mpi=pmix) across both nodes and
  writes the same shards as a single process; the pretraining jobs train on them.
- pretrain.sbatch on 2 nodes runs to completion (the reference run).
- the same job, preempted twice: once through the batch shell only (`scancel --batch
  --signal=USR1`, what `--signal=B:USR1@T` does at the time limit: the script must forward it),
  once through `scancel --full --signal=USR1`. Each time the trainer commits a checkpoint and exits
  75, the script requeues the job (SLURM_RESTART_COUNT 1, then 2), the job resumes and finally
  completes. Before the second restart the job is shrunk to 1 node, so that restart continues
  elastically (universal checkpoint, gradient accumulation doubled). The losses of the resumed
  segments equal the reference run's at the same steps (fp32, dropout off: same-size resumes
  within 1e-6 relative, the elastic one within 1e-4).
- deepspeed_hostfile.sh starts `bertscale doctor` through the deepspeed launcher on both nodes.

Without root or apt (SLURM cannot be installed) the tests skip with the reason; with CI=true they
fail instead. BERTSCALE_SLURM_KEEP=1 keeps the cluster's folder (job logs, run folders) afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STEPS, GLOBAL_BATCH = 16, 8
TRAIN_ARGS = ("--no-wandb --set train.steps=16 --set train.global_batch_size=8 "
              "--set train.micro_batch_size=4 --set checkpoint.every=2 --set eval.at_start=false "
              "--set eval.every=0 --set model.hidden_dropout_prob=0.0 "
              "--set model.attention_probs_dropout_prob=0.0")


# ------------------------------------------------------------------------------ the cluster


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """Environment for sbatch/scontrol talking to the local test cluster."""
    on_ci = os.environ.get("CI", "").lower() == "true"

    def unavailable(reason: str):
        if on_ci:
            pytest.fail(f"SLURM tests must run on CI, but: {reason}")
        pytest.skip(reason)

    if sys.platform != "linux" or shutil.which("bash") is None:
        unavailable("needs Linux and bash")
    base = Path(tempfile.mkdtemp(prefix="bertscale-slurm-"))
    t0 = time.monotonic()
    # Ports of our own: a real SLURM on this machine (6817, 6818) must not meet the test cluster.
    ports = {"SLURM_TEST_CTLD_PORT": str(_free_ports(1)), "SLURM_TEST_NODE_PORT0": str(_free_ports(2))}
    p = subprocess.run(["bash", str(REPO / "tests" / "slurm_cluster.sh"), str(base), "2"],
                       env={**os.environ, **ports}, capture_output=True, text=True, timeout=600)
    if p.returncode == 3:
        unavailable(f"cannot set up SLURM here: {p.stderr.strip().splitlines()[-1]}")
    if p.returncode != 0:
        pytest.fail(f"tests/slurm_cluster.sh failed ({p.returncode}):\n{p.stderr[-4000:]}")
    print(f"local SLURM cluster up in {time.monotonic() - t0:.1f}s at {base}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(SLURM_CONF=str(base / "etc" / "slurm.conf"), DS_ACCELERATOR="cpu",
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               BERTSCALE_BIN=str(Path(sys.executable).with_name("bertscale")),
               # Open MPI between the two virtual nodes: TCP over loopback.
               OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="lo",
               BERTSCALE_SLURM_TEST_BASE=str(base))
    yield env
    subprocess.run(["bash", str(REPO / "tests" / "slurm_stop.sh"), str(base)], capture_output=True,
                   text=True, timeout=120)
    if os.environ.get("BERTSCALE_SLURM_KEEP") != "1":      # keep the job logs to debug
        shutil.rmtree(base, ignore_errors=True)


def _free_ports(n: int) -> int:
    """First of n consecutive loopback ports nobody listens on."""
    import random
    import socket
    for _ in range(200):
        first = random.randint(20000, 60000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def sbatch(env: dict[str, str], script: str, *options: str, args: tuple[str, ...] = (),
           **knobs: str) -> str:
    p = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "slurm" / script), *args],
                       env={**env, **knobs}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=60).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def scontrol(env: dict[str, str], *args: str) -> None:
    p = subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"scontrol {' '.join(args)}: {p.stderr}"


def scancel(env: dict[str, str], *args: str) -> None:
    p = subprocess.run(["scancel", *args], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"scancel {' '.join(args)}: {p.stderr}"


def wait_for(what: str, predicate, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def wait_done(env: dict[str, str], job_id: str, log: Path, timeout: float) -> dict[str, str]:
    return wait_for(f"job {job_id} to end",
                    lambda: (lambda j: j if j.get("JobState") in FINAL else None)(job(env, job_id)),
                    timeout, log)


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step done again after a resume keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def committed_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.parent.name.split("_")[1]) for p in root.glob("step_*/commit.json")) \
        if root.is_dir() else []


# ------------------------------------------------------------------------------ prepare (MPI)


@pytest.fixture(scope="session")
def mpi_prepare(slurm, shared_data):
    """prepare.sbatch on both nodes, one MPI rank per node."""
    work = Path(slurm["BERTSCALE_SLURM_TEST_BASE"]) / "work"
    work.mkdir(exist_ok=True)
    inputs = [shared_data / "wikipedia" / f"wiki_0{i}.gz" for i in (0, 1)]
    args = "--train-vocab 2000 --seq-len 64 --samples-per-shard 200"
    log = work / "prepare.out"
    t0 = time.monotonic()
    job_id = sbatch(slurm, "prepare.sbatch", "--nodes=2", "--ntasks-per-node=1",
                    f"--output={log}", BERTSCALE_INPUTS=" ".join(map(str, inputs)),
                    BERTSCALE_OUT=str(work / "shards"), BERTSCALE_PREPARE_ARGS=args)
    info = wait_done(slurm, job_id, log, 300)
    return {"info": info, "log": log, "out": work / "shards", "inputs": inputs, "args": args,
            "seconds": time.monotonic() - t0}


def test_prepare_runs_as_one_mpi_job_across_both_nodes(mpi_prepare, tmp_path):
    text = mpi_prepare["log"].read_text()
    assert mpi_prepare["info"]["JobState"] == "COMPLETED", text[-4000:]
    assert "2 MPI rank(s) on 2 node(s) [n[1-2]]" in text
    assert "[rank 1] prepare phase 1" in text             # rank 1 did its share of the work
    # The same shards as one process on this machine: the rank count does not change the data.
    from bertscale.commands.prepare import main as prepare
    assert prepare([*map(str, mpi_prepare["inputs"]), "--out", str(tmp_path),
                    *mpi_prepare["args"].split(), "--progress", "none"]) == 0
    mpi, single = mpi_prepare["out"] / "seq64", tmp_path / "seq64"
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in mpi.iterdir()) and len(names) > 5
    for name in names:
        assert (mpi / name).read_bytes() == (single / name).read_bytes(), name
    print(f"prepare job: {mpi_prepare['seconds']:.1f}s wall")


# ------------------------------------------------------------------------------ pretraining


def submit_pretrain(slurm: dict[str, str], manifest: Path, name: str) -> dict:
    work = Path(slurm["BERTSCALE_SLURM_TEST_BASE"]) / "work"
    log = work / f"{name}.out"
    job_id = sbatch(slurm, "pretrain.sbatch", "--nodes=2", "--ntasks-per-node=1",
                    "--gpus-per-node=0", "--cpus-per-task=1", "--time=20", f"--output={log}",
                    f"--job-name={name}", BERTSCALE_RECIPE="tiny_ci",
                    BERTSCALE_RUN_DIR=str(work / name), BERTSCALE_MANIFEST=str(manifest),
                    BERTSCALE_ARGS=TRAIN_ARGS)
    return {"id": job_id, "log": log, "run": work / name, "t0": time.monotonic()}


@pytest.fixture(scope="session")
def reference_job(slurm, mpi_prepare) -> dict:
    """The uninterrupted 2-node run; it runs while the preemption test drives its own job."""
    assert mpi_prepare["info"]["JobState"] == "COMPLETED", mpi_prepare["log"].read_text()[-3000:]
    return submit_pretrain(slurm, mpi_prepare["out"] / "seq64" / "manifest.json", "reference")


def test_preempted_job_requeues_resumes_and_continues_on_one_node(slurm, mpi_prepare,
                                                                  reference_job):
    p = submit_pretrain(slurm, mpi_prepare["out"] / "seq64" / "manifest.json", "preempted")
    jid, log, run = p["id"], p["log"], p["run"]

    def restarts() -> int:
        return int(job(slurm, jid).get("Restarts", 0))

    # 1. After a few committed steps, signal the batch shell only: it must forward the signal.
    wait_for("a committed checkpoint at step >= 4", lambda: any(s >= 4 for s in committed_steps(run)),
             300, log)
    scancel(slurm, "--batch", "--signal=USR1", jid)
    wait_for("the first requeue", lambda: restarts() >= 1, 120, log)
    first_stop = max(committed_steps(run))

    # 2. The requeued job resumes on 2 nodes; once it has made progress, signal everything.
    wait_for("progress after the first restart",
             lambda: any(s >= first_stop + 3 for s in committed_steps(run)), 300, log)
    scancel(slurm, "--full", "--signal=USR1", jid)
    wait_for("the second requeue", lambda: restarts() >= 2, 120, log)
    second_stop = max(committed_steps(run))
    # 3. Before it starts again (a requeued job waits cred_expire = 10 s), give it 1 node.
    scontrol(slurm, "hold", jid)
    scontrol(slurm, "update", f"JobId={jid}", "NumNodes=1", "NumTasks=1")
    scontrol(slurm, "release", jid)

    info = wait_done(slurm, jid, log, 400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Restarts"] == "2"
    # SLURM_RESTART_COUNT as the script saw it, and the node count of each run.
    assert "restart 0: 2 node(s) [n[1-2]]" in text
    assert "restart 1: 2 node(s) [n[1-2]]" in text
    assert "restart 2: 1 node(s)" in text
    assert text.count("got SIGUSR1: forwarding it to the job step") >= 2
    assert text.count("exiting with code 75 to be requeued") >= 2
    assert text.count("requeueing to resume from the last committed checkpoint") == 2
    assert f"resumed from {run / 'checkpoints' / f'step_{first_stop}'} (step {first_stop}" in text
    assert f"(step {second_stop}" in text and "converted from 2 ranks through a universal checkpoint" in text
    assert "global batch 8 = 4 x 2 accumulation x 1" in text    # the global batch is kept

    wait_done(slurm, reference_job["id"], reference_job["log"], 400)
    reference = losses(reference_job["run"])
    curve = losses(run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    report = []
    for step in range(1, STEPS + 1):
        rel = 1e-6 if step <= second_stop else 1e-4      # 2 ranks, then 1 rank
        assert curve[step] == pytest.approx(reference[step], rel=rel), \
            f"step {step}: {curve[step]} vs reference {reference[step]}"
        if step in (first_stop, first_stop + 1, second_stop, second_stop + 1):
            report.append(f"step {step}: {curve[step]:.6f} (reference {reference[step]:.6f})")
    assert committed_steps(run)[-1] == STEPS
    print(f"preempted job: {time.monotonic() - p['t0']:.1f}s wall, stops at steps {first_stop} "
          f"(2 nodes) and {second_stop} (-> 1 node); " + "; ".join(report))


def test_two_node_pretraining_job_completes(slurm, reference_job):
    ref = reference_job
    info = wait_done(slurm, ref["id"], ref["log"], 400)
    text = ref["log"].read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "restart 0: 2 node(s) [n[1-2]] x 1 task(s)" in text
    assert "2 rank(s) on 2 node(s): n1 (1), n2 (1)" in text          # bertscale doctor ran first
    assert "2 rank(s), ZeRO-2 fp32, global batch 8 = 4 x 1 accumulation x 2" in text
    curve = losses(ref["run"])
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert committed_steps(ref["run"])[-1] == STEPS
    assert curve[STEPS] < curve[1]
    print(f"reference 2-node job: {time.monotonic() - ref['t0']:.1f}s wall, "
          f"loss {curve[1]:.4f} -> {curve[STEPS]:.4f}")


def test_master_is_the_first_node_of_the_step_resolved_through_the_controller(slurm, monkeypatch):
    """The rendezvous host every srun task computes: the first node of the step's node list,
    expanded by the real controller's `scontrol show hostnames`, and, where DNS does not know the
    node name (n1 here), its NodeAddr from `scontrol show node`. Called as a function because the
    jobs above only show that the ranks met, not which address they chose. (Until now this was an
    always-skipped test in test_distributed.py: it needed a configured scontrol.)"""
    from bertscale import distributed, nodes
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    base = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "41",
            "SLURM_STEP_NODELIST": "n[1-2]"}
    ranks = [distributed.discover({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": "0"})
             for r in (0, 1)]
    assert [e.rank for e in ranks] == [0, 1]
    assert {(e.master_addr, e.master_port) for e in ranks} == {("127.0.0.1", ranks[0].master_port)}
    assert nodes.slurm_hostnames("n[1-2]") == ["n1", "n2"]


# ------------------------------------------------------------------------------ deepspeed launcher


def test_deepspeed_launcher_with_a_hostfile_from_the_allocation(slurm, tmp_path):
    log = tmp_path / "ds.out"
    t0 = time.monotonic()
    job_id = sbatch(slurm, "deepspeed_hostfile.sh", "--nodes=2", "--gpus-per-node=0",
                    "--cpus-per-task=1", f"--output={log}",
                    args=("doctor", "--run-dir", str(tmp_path / "run")),
                    PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    BERTSCALE_HOSTFILE=str(tmp_path / "hostfile"))
    info = wait_done(slurm, job_id, log, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert (tmp_path / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "2 rank(s) on 2 node(s): n1 (1), n2 (1)" in text
    assert "all checks passed" in text
    print(f"deepspeed launcher job: {time.monotonic() - t0:.1f}s wall")


# ------------------------------------------------------------------------------ fine-tuning


def test_finetune_array_runs_one_glue_task_per_index(slurm, reference_job, shared_data, tmp_path):
    wait_done(slurm, reference_job["id"], reference_job["log"], 400)
    t0 = time.monotonic()
    job_id = sbatch(slurm, "finetune.sbatch", "--array=0-1", "--gpus-per-node=0",
                    "--cpus-per-task=1", f"--output={tmp_path}/ft-%A_%a.out",
                    BERTSCALE_CHECKPOINT=str(reference_job["run"]),
                    BERTSCALE_OUTPUT_DIR=str(tmp_path / "ft"), BERTSCALE_GLUE_TASKS="RTE MRPC",
                    BERTSCALE_FINETUNE_ARGS=(f"--data-dir {shared_data / 'glue'} --lr 5e-5 "
                                             "--max-train-samples 16 --max-eval-samples 16 "
                                             "--max-steps 2 --no-test --device cpu --precision fp32"))
    for index, task in enumerate(("RTE", "MRPC")):
        log = tmp_path / f"ft-{job_id}_{index}.out"
        info = wait_done(slurm, f"{job_id}_{index}", log, 300)
        assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
        assert f"--task {task}" in log.read_text()
        results = json.loads((tmp_path / "ft" / task / "results.json").read_text())
        assert results, task
    print(f"fine-tuning array (RTE, MRPC): {time.monotonic() - t0:.1f}s wall")


def test_finetune_data_parallel_over_two_nodes(slurm, reference_job, shared_data, tmp_path):
    """finetune.sbatch with two tasks on two nodes: srun starts two ranks that find each other
    through SLURM's variables and train one model data-parallel; rank 0 writes the results."""
    wait_done(slurm, reference_job["id"], reference_job["log"], 400)
    t0 = time.monotonic()
    log = tmp_path / "ft2.out"
    job_id = sbatch(slurm, "finetune.sbatch", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                    "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
                    BERTSCALE_CHECKPOINT=str(reference_job["run"]),
                    BERTSCALE_OUTPUT_DIR=str(tmp_path / "ft"),
                    BERTSCALE_FINETUNE_ARGS=(f"--task RTE --data-dir {shared_data / 'glue'} "
                                             "--lr 5e-5 --batch-size 8 --max-train-samples 16 "
                                             "--max-eval-samples 16 --max-steps 2 --no-test "
                                             "--device cpu --precision fp32"))
    info = wait_done(slurm, job_id, log, 300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    results = json.loads((tmp_path / "ft" / "RTE" / "results.json").read_text())
    assert results["world_size"] == 2 and results["runs"][0]["train_steps"] == 2
    assert text.count("RTE  accuracy") == 1          # printed by rank 0 only
    print(f"fine-tuning on 2 nodes: {time.monotonic() - t0:.1f}s wall")
