"""`bertscale doctor` on real ranks (tests/launch.py, gloo on loopback) with real shards made by
`bertscale prepare` from the Wikipedia sample: a healthy setup passes with a summary table; a
corrupted shard, a truncated shard, an unwritable checkpoint folder and a missing GPU each fail
with one line naming the problem; a missing rank fails by timeout instead of hanging."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertscale import doctor
from launch import free_port, run_ranks


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("shards")
    from bertscale.commands.prepare import main as prepare
    rc = prepare([str(shared_data / "wikipedia" / "wiki_00.gz"), "--out", str(out),
                  "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"),
                  "--seq-len", "64", "--samples-per-shard", "500", "--progress", "none"])
    assert rc == 0
    return out / "seq64" / "manifest.json"


def run_doctor(*args: str, world: int = 2) -> list:
    return run_ranks(["-m", "bertscale.cli", "doctor", *args], world, check=False, timeout=180,
                     env={"WANDB_MODE": "offline"})


@pytest.mark.slow
def test_healthy_two_ranks(tmp_path, manifest):
    from bertscale.data.shards import read_manifest
    n = sum(len(v) for v in read_manifest(manifest).shards.values())
    results = run_doctor("--run-dir", str(tmp_path / "run"), "--manifest", str(manifest))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    table = results[0].stdout
    assert "all checks passed" in table
    assert "2 rank(s) on 1 node(s)" in table
    assert "4 MiB gloo all-reduce correct" in table
    assert f"{n}/{n} shards" in table and "sha256 verified" in table
    assert "writable and shared by all ranks" in table
    assert "offline (WANDB_MODE)" in table
    assert results[1].stdout == ""                     # one table, from rank 0
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []   # probes cleaned up


@pytest.mark.slow
def test_each_problem_is_one_clear_line(tmp_path, manifest):
    bad = tmp_path / "shards"
    shutil.copytree(manifest.parent, bad)
    corrupt, truncated = bad / "train-000001.tar", bad / "train-000002.tar"
    data = bytearray(corrupt.read_bytes())
    data[3000] ^= 0x01                                  # one flipped bit, same size
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-512])
    (tmp_path / "a_file").write_text("not a folder")
    results = run_doctor("--run-dir", str(tmp_path / "a_file" / "run"),
                         "--manifest", str(bad / "manifest.json"), "--require-gpu")
    assert [r.returncode for r in results] == [1, 1]
    lines = results[0].stderr.strip().splitlines()
    text = "\n".join(lines)
    assert f"bertscale doctor: FAIL shards: {corrupt}: sha256 differs from the manifest" in text
    assert f"FAIL shards: {truncated}: " in text and "(truncated or replaced)" in text
    assert (f"FAIL checkpoint: {tmp_path / 'a_file' / 'run' / 'checkpoints'} is not writable "
            f"(NotADirectoryError") in text
    if not torch.cuda.is_available():
        assert "FAIL gpus: none visible (CPU run); --require-gpu was given" in text
    assert all(line.startswith("bertscale doctor: FAIL ") for line in lines), text
    assert "Traceback" not in results[0].stderr + results[1].stderr


@pytest.mark.slow
def test_missing_rank_times_out_with_a_message():
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    p = subprocess.run([sys.executable, "-m", "bertscale.cli", "doctor", "--timeout", "3"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "timed out after 3s while joining the process group" in p.stderr


def test_wandb_modes(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert doctor.check_wandb(False).status == doctor.OK
    assert doctor.check_wandb(True).detail == "disabled (--no-wandb)"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")          # no ~/.netrc
    assert "no API key" in doctor.check_wandb(False).detail
    # A key but no server: only loopback here, a port nobody listens on.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    f = doctor.check_wandb(False, timeout=2)
    assert f.status == doctor.WARN and "unreachable" in f.detail and "log offline" in f.detail
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert doctor.check_wandb(False, timeout=2).status == doctor.OK
