"""GPUs allocated to a torch that cannot use them are refused with one line, before anything
starts: `bertscale pretrain` and `bertscale doctor` run here (a CPU-only machine, whatever its
torch build) with the variables a launcher or SLURM sets on a GPU node. DS_ACCELERATOR=cpu (set
for every test by conftest.py) is the documented way to run on the CPU on purpose, so these
commands run without it.

Binding a rank to `local_rank % visible GPUs` and spotting two ranks on one GPU need GPUs to
show through the commands; those two are tested as functions (`device_index`, `shared_gpus`),
and benchmarks/gpu_check.sh runs the 2-rank NCCL case on a machine with 2+ GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bertscale.distributed import allocated_gpus, device_index
from bertscale.doctor import FAIL, shared_gpus

pytestmark = pytest.mark.skipif(__import__("torch").cuda.is_available(),
                                reason="this machine's torch can use its GPUs")

ALLOCATIONS = [("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_STEP_GPUS", "5")]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE",
                         "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")}
    return subprocess.run([sys.executable, "-m", "bertscale.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**base, **env})


@pytest.mark.parametrize("name,value", ALLOCATIONS)
def test_pretrain_refuses_gpus_it_cannot_use(tmp_path, name, value):
    p = _cli("pretrain", "tiny_ci", "--run-dir", str(tmp_path / "run"), **{name: value})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{name}={value}: GPUs are allocated to this job, but torch" in lines[0]
    assert "DS_ACCELERATOR=cpu" in lines[0]
    assert not (tmp_path / "run").exists()          # refused before anything was written


def test_doctor_refuses_too_and_an_explicit_cpu_choice_passes(tmp_path):
    p = _cli("doctor", "--no-wandb", SLURM_GPUS_ON_NODE="4", SLURM_JOB_GPUS="0,1,2,3")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "SLURM_JOB_GPUS=0,1,2,3: GPUs are allocated" in p.stderr
    # No GPUs allocated, or DS_ACCELERATOR=cpu: past the check, to the next error (the missing
    # shards) or a passing doctor.
    for env in ({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0"},
                {"CUDA_VISIBLE_DEVICES": "0", "DS_ACCELERATOR": "cpu"}):
        p = _cli("pretrain", "tiny_ci", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.manifest={str(tmp_path / 'none.json')!r}", **env)
        assert p.returncode == 2 and "GPUs are allocated" not in p.stderr, (env, p.stderr)
        assert "none.json" in p.stderr, (env, p.stderr)
    p = _cli("doctor", "--no-wandb", "--cpu", SLURM_GPUS_ON_NODE="4")
    assert p.returncode == 0, p.stderr


def test_what_counts_as_allocated_gpus():
    assert allocated_gpus({"CUDA_VISIBLE_DEVICES": "0"}) == "CUDA_VISIBLE_DEVICES=0"
    assert allocated_gpus({"SLURM_GPUS_ON_NODE": "8"}) == "SLURM_GPUS_ON_NODE=8"
    for none in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                 {"SLURM_JOB_GPUS": "NoDevFiles"}, {"SLURM_GPUS_ON_NODE": "0"}):
        assert allocated_gpus(none) is None, none


def test_local_rank_binds_modulo_the_visible_gpus():
    # 8 tasks on a node, each given its own GPU by the scheduler: every one binds to index 0.
    assert [device_index(r, 1) for r in range(8)] == [0] * 8
    assert [device_index(r, 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert device_index(3, 0) == 0


def test_two_ranks_on_one_gpu_is_a_failure():
    findings = shared_gpus([("n1", "GPU-a"), ("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"),
                            ("n2", None)])
    assert len(findings) == 1 and findings[0].status == FAIL
    assert "ranks 0, 1 share one GPU (GPU-a) on n1" in findings[0].detail
    assert shared_gpus([("n1", "GPU-a"), ("n2", "GPU-a")]) == []
