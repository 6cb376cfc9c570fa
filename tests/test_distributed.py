"""Launcher discovery (torchrun / deepspeed env, Open MPI, PMI, SLURM), and preemption agreement
across real ranks: a signal to ONE rank makes every rank's next read (the trainer's agreement,
bertscale.training.agreement.Reads) see a preemption.

The environment tables below are the variables each launcher really sets; discovery is a pure
function of them. The multi-process tests start real ranks (our loopback launcher, and Open MPI's
mpirun when it is installed) and a real gloo process group through DeepSpeed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertscale import distributed
from bertscale.errors import UserError

WORKER = Path(__file__).parent / "workers" / "pretrain_dist_worker.py"


def test_env_launcher_torchrun_variables():
    env = distributed.discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7",
                                "MASTER_PORT": "29500"})
    assert env == distributed.DistEnv(3, 8, 1, 2, "10.0.0.7", 29500, "env")


def test_env_launcher_needs_master_for_several_ranks():
    with pytest.raises(UserError, match="MASTER_ADDR or MASTER_PORT"):
        distributed.discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_open_mpi_variables_take_precedence_over_slurm():
    # mpirun inside an allocation: SLURM's variables describe the batch step, not the ranks.
    env = distributed.discover({
        "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "1234",
        "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"})
    assert env == distributed.DistEnv(5, 6, 1, 2, "node1", 1234, "mpi")


def test_pmi_variables():
    env = distributed.discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0",
                                "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "h", "MASTER_PORT": "2000"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (2, 4, 0, "mpi")


def test_slurm_port_from_job_id_and_step_tasks():
    base = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_ADDR": "n1"}
    env = distributed.discover(base)
    # The step's task count (srun -n 4 inside an 8-task allocation), the same port on every task.
    assert env == distributed.DistEnv(3, 4, 1, 2, "n1", 20000 + 123456 % 20000, "slurm")
    assert distributed.discover({**base, "MASTER_PORT": "31000"}).master_port == 31000


def test_slurm_refuses_a_batch_script_without_srun():
    with pytest.raises(UserError, match="not started by srun"):
        distributed.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9",
                              "SLURM_JOB_NODELIST": "n[1-2]"})


@pytest.mark.parametrize("bad, message", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 .* outside"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a TCP port"),
])
def test_bad_variables_are_named(bad, message):
    with pytest.raises(UserError, match=message):
        distributed.discover(bad)


def test_single_process_without_launcher():
    env = distributed.discover({})
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")


def _records(stdout: str) -> list[dict]:
    """The workers' one-line JSON records. mpirun forwards each rank's output in chunks, so two
    ranks' lines can arrive spliced into one: the (flat) objects are found wherever they are."""
    return [json.loads(m) for m in re.findall(r"\{[^{}]*\}", stdout)]


@pytest.mark.slow
def test_signal_to_one_rank_is_seen_by_all_ranks():
    from launch import run_ranks

    results = run_ranks([str(WORKER), "1"], 2, timeout=240)
    recs = sorted((r for res in results for r in _records(res.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["sum"] == 3.0 and r["dist_rank"] == r["rank"] for r in recs)
    assert [r["before"] for r in recs] == [False, False]
    # Only rank 1 got the signal, yet both ranks agree at the step boundary.
    assert [r["local_flag"] for r in recs] == [False, True]
    assert [r["after"] for r in recs] == [True, True]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpirun_layout_and_port_broadcast():
    # No RANK / MASTER_PORT: ranks come from OMPI_COMM_WORLD_*, rank 0 picks the port and
    # broadcasts it over MPI. MASTER_ADDR is pinned to loopback (tests never leave 127.0.0.1).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["MASTER_ADDR"] = "127.0.0.1"
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--mca", "btl", "self,vader",
           "--mca", "oob_tcp_if_include", "lo", "-x", "MASTER_ADDR", "-x", "GLOO_SOCKET_IFNAME",
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "PATH",
           sys.executable, str(WORKER), "0"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = sorted(_records(proc.stdout), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["launcher"]) for r in recs] == [(0, 2, "mpi"), (1, 2, "mpi")]
    assert recs[0]["port"] == recs[1]["port"] and recs[0]["addr"] == "127.0.0.1"
    assert all(r["sum"] == 3.0 for r in recs)
    assert [r["after"] for r in recs] == [True, True]
