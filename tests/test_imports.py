"""Imports point down: no library module imports the command layer, no command module imports
`bertscale.cli` or another command's module, `bertscale NAME` imports only NAME's module, and
reading a recipe imports no torch.

The checks run in fresh interpreters (this test process has imported everything). Importing
each command module in its own interpreter would import torch a dozen times (over a minute on
two cores), so one interpreter does them in turn and removes every `bertscale` module from
sys.modules before each: every check starts with no bertscale module loaded, which is what it
looks at; third-party modules (torch) stay loaded, which is not.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from bertscale.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent

# Every module that is a command or a subcommand with its own handler. The finetune tasks are
# siblings of one another (`finetune ner` must not load the GLUE code) and of the finetune
# command (bertscale.commands.finetune).
COMMAND_MODULES = sorted({*COMMANDS.values(), "bertscale.finetune.glue",
                          "bertscale.finetune.squad", "bertscale.finetune.swag",
                          "bertscale.finetune.ner"})

# Runs in the child: `check(name, fn)` calls fn with no bertscale module loaded and records
# fn's result, the exit code if it exits, and the bertscale modules (and torch, if fn is what
# imported it: an earlier check's torch stays loaded, so only the first importer is seen) that
# are loaded after it.
_HARNESS = """
import contextlib, importlib, io, json, sys
results = {}
def check(name, fn):
    for m in [m for m in sys.modules if m == "bertscale" or m.startswith("bertscale.")]:
        del sys.modules[m]
    before = set(sys.modules)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = fn()
        except SystemExit as e:
            code = e.code
    loaded = sorted(m for m in set(sys.modules) - before
                    if m == "torch" or m.startswith("bertscale"))
    results[name] = {"code": code, "stdout": out.getvalue(), "loaded": loaded}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _child(body: str) -> dict[str, dict]:
    """Run the harness and `body` (calls of `check`) in a fresh interpreter; its results."""
    code = _HARNESS + body + "\nprint(json.dumps(results))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in a module's source, at any depth (the lazy ones in
    functions too), relative ones resolved, and `importlib.import_module("...")` of a literal."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from bertscale import commands` names a module too.
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def test_no_library_module_imports_the_command_layer() -> None:
    """The command layer (bertscale.commands, its `bertscale.cli` and `python -m bertscale`
    entries, and the modules COMMANDS names) is imported by nothing below it: library modules
    take typed configs. Read from the source, so an import inside a function or through
    importlib counts as well. Failed before the command layer had a package of its own
    (`pretrain.py`, `data/prepare.py`, `embed.py`, `launch.py` and `bench/__init__.py` each
    imported `bertscale.commands` for their `python -m` entries)."""
    layer = {"bertscale.commands", "bertscale.cli", "bertscale.__main__", *COMMANDS.values()}

    def in_layer(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in layer)

    bad = []
    for path in sorted((REPO / "bertscale").rglob("*.py")):
        module = _module_name(path)
        if in_layer(module):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, target in _imported(tree, module, path.name == "__init__.py"):
            if in_layer(target):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_command_module_imports_the_cli_or_a_sibling_command() -> None:
    results = _child("".join(f"check({m!r}, lambda: importlib.import_module({m!r}) and 0)\n"
                             for m in COMMAND_MODULES))
    bad = []
    for module in COMMAND_MODULES:
        loaded = set(results[module]["loaded"])
        assert module in loaded
        upward = sorted(loaded & ({"bertscale.cli", *COMMAND_MODULES} - {module}))
        if upward:
            bad.append(f"import {module} also imports {', '.join(upward)}")
    assert not bad, "\n".join(bad)


def test_a_command_imports_only_its_own_module() -> None:
    """`bertscale NAME --help` (the console script's `main`) loads NAME's module and no other
    command's (`finetune` registers its tasks without importing them), and no torch: a
    launcher's ranks and a user's `--help` pay only for what runs. `python -m bertscale` is the
    same command line."""
    results = _child("from importlib import import_module\n" + "".join(
        f"check({n!r}, lambda: import_module('bertscale.cli').main([{n!r}, '--help']))\n"
        for n in COMMANDS))
    bad = []
    for name, r in results.items():
        assert r["code"] == 0, f"bertscale {name} --help: exit {r['code']}"
        assert r["stdout"].startswith(f"usage: bertscale {name}"), r["stdout"][:200]
        loaded = set(r["loaded"])
        assert {"bertscale.cli", COMMANDS[name]} <= loaded, sorted(loaded)
        others = sorted(loaded & ({"torch", *COMMAND_MODULES} - {COMMANDS[name]}))
        if others:
            bad.append(f"bertscale {name} --help imports {', '.join(others)}")
    assert not bad, "\n".join(bad)
    proc = subprocess.run([sys.executable, "-m", "bertscale", "pretrain", "--list"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "tiny_ci" in proc.stdout, proc.stderr


def test_every_shipped_recipe_loads_without_torch() -> None:
    """A library call: every shipped recipe (the command reads one per run) is read and
    validated, its optimizer and schedule typed, with torch never imported."""
    results = _child("""
def load_all():
    from bertscale.config import (OptimizerConfig, ScheduleConfig, builtin_recipe,
                                  load_pretrain_recipe)
    paths = sorted(builtin_recipe("tiny_ci").parent.glob("*.toml"))
    for path in paths:
        r = load_pretrain_recipe(path)
        assert isinstance(r.optimizer, OptimizerConfig) and isinstance(r.schedule, ScheduleConfig)
    return len(paths)
check("recipes", load_all)
""")
    assert results["recipes"]["code"] >= 6
    assert "torch" not in results["recipes"]["loaded"]


def test_a_bad_optimizer_field_is_refused_before_torch_is_imported() -> None:
    """`bertscale pretrain RECIPE --set optimizer...`: the mistake is one line, exit 2, and the
    command has not paid for importing torch to find it."""
    cases = {"optimizer.lr=-1": "optimizer.lr must be a positive number, got -1.0",
             "schedule.power=0": "schedule.power must be positive, got 0"}
    for override, message in cases.items():
        code = ("import sys\nfrom bertscale.cli import main\ncode = main(['pretrain', "
                f"'tiny_ci', '--set', {override!r}])\n"
                "print(code, 'torch' in sys.modules)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=_env(), cwd=REPO, timeout=120)
        errors = proc.stderr.strip().splitlines()
        assert proc.stdout.split() == ["2", "False"], (override, proc.stdout, proc.stderr)
        assert len(errors) == 1 and message in errors[0], errors
