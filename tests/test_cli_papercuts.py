"""`bertscale pretrain --list` and `--print-config`: what a new user asks before the first run
(which recipes and presets exist, what a recipe resolves to), answered without starting one."""

from __future__ import annotations

import json

from bertscale.cli import main as bertscale


def test_pretrain_list_names_every_builtin_recipe_and_preset(capsys) -> None:
    from bertscale.config import PRESETS, builtin_recipe
    assert bertscale(["pretrain", "--list"]) == 0
    out = capsys.readouterr().out
    for path in builtin_recipe("tiny_ci").parent.glob("*.toml"):
        assert f"\n  {path.stem} " in out, path.stem
    for name in PRESETS:
        assert f"\n  {name} " in out, name
    assert "BERT-Large, phase 1" in out and "L=24 H=1024 A=16" in out


def test_pretrain_print_config_resolves_the_recipe_and_deepspeed(capsys) -> None:
    """The overrides are applied, and the DeepSpeed JSON carries the batch fields the run would
    inject (one process: accumulation = global / micro)."""
    assert bertscale(["pretrain", "tiny_ci", "--set", "train.steps=7", "--set",
                      "train.global_batch_size=16", "--set", "train.micro_batch_size=4",
                      "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["recipe"]["name"] == "tiny_ci" and cfg["recipe"]["train"]["steps"] == 7
    assert cfg["world_size"] == 1
    ds = cfg["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (16, 4, 4)
    assert ds["zero_optimization"]["stage"] == 2 and cfg["deepspeed_config_file"].endswith(".json")


def test_pretrain_without_a_recipe_says_how_to_list_them(capsys) -> None:
    assert bertscale(["pretrain"]) == 2
    err = capsys.readouterr().err
    assert "give a recipe" in err and "pretrain --list" in err and "Traceback" not in err
