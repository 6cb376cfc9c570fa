"""The installed package is the product: a wheel built from this checkout, installed into a fresh
virtual environment, runs `bertscale demo` and `bertscale pretrain` from an empty folder outside
the repository.

The fresh venv gets the wheel itself; its dependencies (torch, DeepSpeed, ...) come from the test's
own environment through a .pth line (reinstalling torch per test run would cost minutes and the
network). That line adds the dependencies' folder only: an editable bertscale installed there is
NOT importable through it (its finder lives in a .pth file of that folder, which Python runs only
for site directories), and the test checks that `bertscale` is imported from the fresh venv.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from: the files setuptools reads (symlinks kept: the package's
# deepspeed_configs is one).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "bertscale", "deepspeed_configs")


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the wheel, a scratch folder, environment without this checkout on sys.path)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        s = REPO / name
        if s.is_dir():
            shutil.copytree(s, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(s, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(base / "dist"), str(src)], base, env, 300)
    (wheel,) = (base / "dist").glob("bertscale-*.whl")
    return wheel, base, env


@pytest.fixture(scope="module")
def installed(built) -> tuple[Path, dict[str, str]]:
    """(fresh venv's bin folder, environment without this checkout on sys.path)."""
    wheel, base, env = built
    env = dict(env)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], base, env, 300)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     base, env, 60).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], base, env, 300)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # DeepSpeed's op as this environment built it (same torch and DeepSpeed through deps.pth):
    # a fresh venv would otherwise build it again (bertscale.jitbuild: one cache per
    # environment, tested in test_build_lock.py), a minute of this test spent in the compiler.
    from bertscale import jitbuild
    env["TORCH_EXTENSIONS_DIR"] = str(jitbuild.cache_dir())
    return venv / "bin", env


def _next_commands(report: str) -> list[str]:
    """The commands under the demo report's "next:" line, without their comments."""
    lines = report.split("\nnext:\n", 1)[1].splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.startswith("  bertscale ")]


def test_wheel_ships_the_license(built):
    """Failed before the fix: pyproject.toml said Apache-2.0, but neither the repository nor the
    wheel held the license text."""
    import zipfile
    wheel, _, _ = built
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist() if ".dist-info/licenses/" in n]
        assert licenses == [f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/licenses/LICENSE"], licenses
        text = z.read(licenses[0]).decode()
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert text == (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


@pytest.mark.slow
def test_wheel_demo_and_pretrain_from_an_empty_folder(installed, shared_data, tmp_path):
    """`bertscale demo` (2 steps, 1 process) and `bertscale prepare` + `bertscale pretrain tiny_ci`
    on real Wikipedia text, each from an empty folder outside the repository, with the wheel's
    package: the built-in DeepSpeed configs and recipes must come from inside it."""
    bin_dir, env = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import bertscale; print(bertscale.__file__)"],
                 empty, env, 60).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent), f"bertscale imported from {where}, not the fresh venv"
    assert not Path(where).is_relative_to(REPO)

    demo = _run([str(bin_dir / "bertscale"), "demo", "--nproc", "1", "--steps", "2",
                 "--vocab-size", "1000", "--set", "eval.samples=8", "--run-dir", "d"],
                empty, env, 600)
    assert "bertscale demo: done" in demo.stdout, demo.stdout[-2000:]
    assert (empty / "d" / "run" / "checkpoints" / "step_2").is_dir()
    # The report ends with the next commands, not a Python function (failed before: "load with
    # bertscale.checkpoint.load_consolidated"): the export runs as printed, the fine-tuning
    # parses with its placeholder GLUE folder.
    export, finetune = _next_commands(demo.stdout)
    assert export == "bertscale export --from d/run --to d/hf/run", demo.stdout[-2000:]
    _run(["bash", "-c", export], empty, env, 300)
    assert json.loads((empty / "d" / "hf" / "run" / "config.json").read_text())["architectures"]
    assert finetune.startswith("bertscale finetune glue --task RTE --data-dir GLUE/RTE "
                               "--checkpoint d/run --output-dir d/finetuned/run")
    from bertscale.cli import build_parser
    assert build_parser().parse_args(shlex.split(finetune)[1:]).func
    # A second demo keeps the first run (failed before: "removing the previous demo run").
    again = _run([str(bin_dir / "bertscale"), "demo", "--nproc", "1", "--steps", "1",
                  "--vocab-size", "1000", "--set", "eval.samples=8", "--run-dir", "d"],
                 empty, env, 600)
    assert "earlier demo runs in d are kept; this one goes to d/run-2" in again.stdout
    assert (empty / "d" / "run" / "checkpoints" / "step_2").is_dir()
    assert (empty / "d" / "run-2" / "checkpoints" / "step_1").is_dir()
    assert _next_commands(again.stdout)[0] == "bertscale export --from d/run-2 --to d/hf/run-2"

    _run([str(bin_dir / "bertscale"), "prepare", str(shared_data / "wikipedia" / "wiki_02.gz"),
          "--out", "shards", "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"),
          "--samples-per-shard", "500", "--eval-fraction", "0.05", "--progress", "none"],
         empty, env, 600)
    manifest = empty / "shards" / "seq128" / "manifest.json"
    train = _run([str(bin_dir / "bertscale"), "pretrain", "tiny_ci", "--run-dir", "run",
                  "--set", f"data.manifest={json.dumps(str(manifest))}", "--set", "train.steps=2",
                  "--set", "schedule.warmup=1", "--set", "eval.samples=8", "--set", "checkpoint.every=2"],
                 empty, env, 600)
    assert "done: 2 steps" in train.stdout, train.stdout[-2000:]
    used = json.loads((empty / "run" / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == 2
    # The tensorboard extra is declared: the wheel's metadata names it.
    meta = _run([str(bin_dir / "python"), "-c",
                 "import importlib.metadata as m; print(m.metadata('bertscale').get_all('Provides-Extra'))"],
                empty, env, 60).stdout
    assert "tensorboard" in meta and "hf" in meta
