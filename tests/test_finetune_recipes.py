"""Fine-tuning recipes through `bertscale finetune glue|squad|swag|ner`: the paper's recipes are
the defaults, `--list` and `--print-config` answer without a run (no data, no weights needed),
every flag is a recipe key that `--set` and a recipe file of the user's can set too, and a bad
value is one line naming the key the way the user wrote it (flag, `--set`, or their file).

Before issue 23 the settings were argparse defaults plus a dict of strings: there was no
`--list`, `--print-config`, `--set` or recipe file (each of these exited 2 as an unknown
argument)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertscale.cli import main as bertscale

PAPER = {  # Devlin et al. 2018, Sections 4.1-4.4: (learning rates, batch, epochs)
    ("glue",): ([5e-5, 4e-5, 3e-5, 2e-5], 32, 3.0),
    ("squad", "--version", "1.1"): ([5e-5], 32, 3.0),
    ("squad", "--version", "2.0"): ([5e-5], 48, 2.0),
    ("swag",): ([2e-5], 16, 3.0),
}


def _config(capsys, *argv: str) -> dict:
    assert bertscale(["finetune", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv: str) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert bertscale(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("bertscale finetune: error: "), err
    return err.removeprefix("bertscale finetune: error: ")


def test_the_papers_recipes_are_shipped_listed_and_the_defaults(capsys) -> None:
    for argv, (lrs, batch, epochs) in PAPER.items():
        train = _config(capsys, *argv)["train"]
        assert (train["lr"], train["batch_size"], train["epochs"]) == (lrs, batch, epochs), argv
        assert train["warmup"] == 0.1 and train["weight_decay"] == 0.01
    for family, names in (("glue", ["glue"]), ("squad", ["squad_v1.1", "squad_v2.0"]),
                          ("swag", ["swag"]), ("ner", ["ner", "ner_feature"])):
        assert bertscale(["finetune", family, "--list"]) == 0
        out = capsys.readouterr().out
        for name in names:
            assert f"\n  {name} " in out, (family, name, out)
            # by its name as a positional RECIPE too
            assert _config(capsys, family, name)["name"] == name
        words = " ".join(out.split())   # the first sentence of each, never cut at "et al."
        assert words.count("(Devlin et al. 2018, Section ") == len(names), words
        assert words.endswith("."), words
    assert _config(capsys, "ner", "--mode", "feature")["ner"]["tagger"] == "bilstm"


def test_flags_set_and_recipe_files_are_one_recipe(capsys, tmp_path: Path) -> None:
    """Every flag sets its key; `--set` wins over a flag; a recipe file of the user's is the
    base the flags and `--set` apply to."""
    cfg = _config(capsys, "glue", "--task", "MRPC", "--lr", "3e-5,2e-5", "--seeds", "1,2",
                  "--batch-size", "16", "--no-test", "--checkpoint-every", "5",
                  "--set", "train.batch_size=8", "--set", "train.epochs=2")
    assert cfg["data"]["task"] == "MRPC" and cfg["data"]["predict_test"] is False
    assert cfg["train"]["lr"] == [3e-5, 2e-5] and cfg["train"]["seeds"] == [1, 2]
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (8, 2.0)
    assert cfg["checkpoint"]["every"] == 5

    mine = tmp_path / "mine.toml"
    mine.write_text('family = "swag"\n[train]\nlr = [1e-5]\nbatch_size = 24\n'
                    '[data]\nmax_seq_length = 96\n')
    cfg = _config(capsys, "swag", str(mine), "--epochs", "4")
    assert cfg["name"] == "mine" and cfg["train"]["lr"] == [1e-5]
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"]) == (24, 4.0)
    assert cfg["data"]["max_seq_length"] == 96
    # A recipe for another command is refused, naming both.
    assert "not glue" in _error(capsys, "glue", str(mine), "--print-config")


def test_a_bad_value_names_the_key_as_the_user_wrote_it(capsys, tmp_path: Path) -> None:
    assert _error(capsys, "glue", "--batch-size", "0", "--print-config") == \
        "--batch-size must be positive, got 0"
    err = _error(capsys, "glue", "--set", "train.batch_size=0", "--print-config")
    assert err.startswith("--set train.batch_size=0 (over ") and \
        err.endswith(": train.batch_size must be positive, got 0"), err
    err = _error(capsys, "swag", "--set", "train.bogus=1", "--print-config")
    assert "unknown field 'train.bogus'" in err and err.startswith("--set train.bogus=1"), err
    assert _error(capsys, "glue", "--task", "MRPCC", "--print-config").startswith(
        "--task 'MRPCC': unknown GLUE task")
    mine = tmp_path / "mine.toml"
    mine.write_text('family = "glue"\n[train]\nwarmup = 1.5\n')
    assert _error(capsys, "glue", str(mine), "--print-config") == \
        f"{mine}: train.warmup is a fraction in [0, 1), got 1.5"
    # What only a run needs is checked when it runs, by its flag.
    assert _error(capsys, "glue", "--task", "MRPC", "--output-dir", str(tmp_path / "o"),
                  "--data-dir", str(tmp_path)) == "--checkpoint is required (the recipe has none)"
    assert _error(capsys, "squad", "--print-config").startswith("give --version 1.1 or 2.0")


@pytest.mark.parametrize("family", ["glue", "squad", "swag", "ner"])
def test_every_recipe_key_is_in_the_generated_reference(family: str) -> None:
    """docs/configuration.md is generated from the recipe classes (test_docs checks it is
    current); every key of each family's recipe has its row there, under its section."""
    import dataclasses

    from bertscale.finetune.recipe import RECIPES
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    cls = RECIPES[family]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in ("train", "checkpoint", "logging",
                                                           "fast", "output", "data", "decode",
                                                           "ner"):
            section = f.default_factory()  # type: ignore[misc]
            assert f"`bertscale.finetune.recipe.{type(section).__name__}`" in doc
            for g in dataclasses.fields(section):
                assert f"| `{g.name}` |" in doc, (family, f.name, g.name)
        else:
            assert f"| `{f.name}` |" in doc, (family, f.name)
