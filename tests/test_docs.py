"""The docs check: documentation that cannot rot.

- docs/configuration.md is exactly what `python -m bertscale.configdoc` generates.
- Every `bertscale …` command in README.md and docs/*.md parses with the real CLI parser (the
  subcommand exists, its flags exist, required arguments are given).
- The blocks fenced as ```bash docs-check are run, in order, in a scratch folder holding a small
  real corpus (Wikipedia from ../shared/data) and GLUE RTE, and must all succeed.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bertscale import configdoc
from bertscale.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, info after it, body) of every fenced block."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(path.read_text())]


def _commands(body: str) -> list[str]:
    """Shell lines of a block with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def _bertscale_argv(line: str) -> list[str] | None:
    """The arguments after `bertscale` (or `-m bertscale.cli`) in a shell line, if any."""
    words = shlex.split(line)
    for i, w in enumerate(words):
        if w == "bertscale" or w.endswith("/bertscale"):
            return words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "bertscale.cli":
            return words[i + 2:]
    return None


def test_configuration_reference_is_generated():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == configdoc.render(), \
        "docs/configuration.md is stale: run `python -m bertscale.configdoc > docs/configuration.md`"


def _all_bertscale_lines() -> list[tuple[str, str]]:
    found = []
    for path in DOC_FILES:
        for lang, _, body in _blocks(path):
            if lang not in ("bash", "sh", "console"):
                continue
            for line in _commands(body):
                if lang == "console":  # a transcript: only the `$ ` lines are commands
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                if _bertscale_argv(line) is not None:
                    found.append((path.name, line))
    return found


def test_docs_name_commands():
    names = {line.split()[1] for _, line in _all_bertscale_lines()
             if line.startswith("bertscale ")}
    # The docs cover the whole pipeline; a missing one means a section was lost.
    assert {"prepare", "pretrain", "finetune", "export", "embed", "doctor"} <= names, names


@pytest.mark.parametrize("where,line", _all_bertscale_lines(), ids=lambda v: v[:60])
def test_every_documented_command_parses(where, line, capsys):
    argv = _bertscale_argv(line)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        pytest.fail(f"{where}: `{line}` does not parse (exit {e.code}): {err.strip()[-400:]}")
    assert getattr(args, "func", None), f"{where}: `{line}` names no runnable subcommand"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the whole quick start in one test: prepare to predict
def test_docs_check_blocks_run(tmp_path, shared_data):
    blocks = [(path, body) for path in DOC_FILES for lang, info, body in _blocks(path)
              if lang == "bash" and "docs-check" in info.split()]
    assert blocks, "no ```bash docs-check block in the docs"

    # A small real corpus: two Wikipedia files, and plain lines for `embed`.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("wiki_00.gz", "wiki_01.gz"):
        shutil.copy(shared_data / "wikipedia" / name, corpus / name)
    with gzip.open(shared_data / "wikipedia" / "wiki_02.gz", "rt", encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("<")][:200]
    (corpus / "notes.txt").write_text("\n".join(lines) + "\n")
    shutil.copytree(shared_data / "glue" / "RTE", tmp_path / "glue" / "RTE")

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               WANDB_MODE="disabled", OMP_NUM_THREADS="2")
    outputs = []
    for path, body in blocks:
        for line in _commands(body):
            proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, text=True,
                                  capture_output=True, timeout=600)
            assert proc.returncode == 0, (f"{path.name}: `{line}` failed with {proc.returncode}:\n"
                                          f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            outputs.append((line, proc.stdout + proc.stderr))
    # What the quick start says each step writes: every plain file name in its table.
    for expected in ("data/seq128/manifest.json", "hf/tiny/config.json", "hf/tiny/model.safetensors",
                     "features/manifest.json", "finetuned/RTE/results.json"):
        assert (tmp_path / expected).exists(), f"{expected} missing after the docs-check commands"
    for folder, names in _quickstart_table():
        for name in names:
            assert (tmp_path / folder / name).exists(), \
                f"quickstart.md says {folder}{name} is written; it is not"
    # Our own lines, not the libraries': DeepSpeed's accelerator and "untested optimizer"
    # warnings and zero_to_fp32's progress (fine-tuning from runs/tiny) are held back ...
    for line, out in outputs:
        for chatter in ("untested optimizer", "Setting ds_accelerator", "Processing zero checkpoint"):
            assert chatter not in out, f"`{line}` printed DeepSpeed's {chatter!r}"
    # ... and --verbose shows them.
    proc = subprocess.run(["bertscale", "finetune", "glue", "--task", "RTE", "--data-dir", "glue/RTE",
                           "--checkpoint", "runs/tiny", "--output-dir", "verbose", "--max-steps", "1",
                           "--max-eval-samples", "8", "--no-test", "--verbose"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Processing zero checkpoint" in proc.stdout + proc.stderr


def _quickstart_table() -> list[tuple[str, list[str]]]:
    """(folder, plain file names) of the quick start's "what each step wrote" table."""
    rows = []
    for line in (REPO / "docs" / "quickstart.md").read_text().splitlines():
        m = re.match(r"\| `([\w/.-]+/)` \| (.*) \|$", line)
        if m:
            names = [n for n in re.findall(r"`([^`]+)`", m.group(2))
                     if re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)*/?", n) and "_N" not in n]
            rows.append((m.group(1), names))
    assert rows, "quickstart.md has no table of what each step wrote"
    return rows


def test_the_command_line_is_built_without_torch():
    """`bertscale --help` and every parser are torch-free: a launcher's ranks and a user's
    `--help` do not pay seconds of imports for subcommands they do not run."""
    import subprocess
    import sys
    code = ("import sys; from bertscale.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in ('torch', 'deepspeed', 'transformers') "
            "if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
