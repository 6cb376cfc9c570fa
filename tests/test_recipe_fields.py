"""Every field of every recipe dataclass (bertscale.config) is checked before any process group
starts: `bertscale pretrain tiny_ci --set KEY=BAD` is refused with exit 2 and one line naming
KEY, for a bad value of each field, and for NaN / infinity in each float field.

The walk is over the dataclasses themselves, so a field added later without an entry in `BAD`
(and without the validation its bad value needs) fails `test_every_field_has_a_bad_value`.

Before the fix four of these failed after the process group had started (found by a hostile run,
issue 22 item 8): `train.seed=-1` (numpy's ValueError), `model.type_vocab_size=1` with NSP pairs
(IndexError in the embedding), `model.initializer_range=-0.02` (RuntimeError in the
initialisation), `model.layer_norm_eps=-1` (accepted: NaN loss, exit 3). So did the NaN and
infinity cases, `data.max_bad_samples=-1`, an empty `name`, a W&B project name W&B refuses,
and a `data.shard_base` / `data.cache_dir` that cannot be a folder.

The command runs in this process (`bertscale.cli.main` with the user's argv: ~90 runs of it as
subprocesses would take minutes); `distributed.init` is replaced by a function that fails the
test, which is what "before any process group" means here.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from bertscale import config as config_lib
from pretrain_runs import manifest  # noqa: F401

# key -> (bad value as written after `--set KEY=`, text the refusal must contain besides KEY)
BAD: dict[str, tuple[str, str]] = {
    "name": ('""', "must not be empty"),
    "run_dir": ('"/dev/null/run"', "is not a folder"),
    "model.vocab_size": ("0", "must be positive"),
    "model.hidden_size": ("0", "must be positive"),
    "model.num_hidden_layers": ("0", "must be positive"),
    "model.num_attention_heads": ("5", "is not divisible by"),
    "model.intermediate_size": ("0", "must be positive"),
    "model.hidden_act": ('"swish"', "is not allowed"),
    "model.hidden_dropout_prob": ("1.0", "must be in [0, 1)"),
    "model.attention_probs_dropout_prob": ("-0.1", "must be in [0, 1)"),
    "model.max_position_embeddings": ("64", "128-token sequences"),
    "model.type_vocab_size": ("1", "sentence pairs"),
    "model.initializer_range": ("-0.02", "must be positive"),
    "model.layer_norm_eps": ("-1", "must be positive"),
    "model.pad_token_id": ("-1", "outside the vocabulary"),
    "data.manifest": ('"/nonexistent/seq128/manifest.json"', "not found"),
    "data.mask_prob": ("0", "must be in (0, 1)"),
    "data.max_predictions_per_seq": ("0", "must be positive"),
    "data.whole_word_masking": ('"yes"', "must be bool"),
    "data.num_workers": ("-1", "must be >= 0"),
    "data.bad_sample_policy": ('"ignore"', "is not allowed"),
    "data.max_bad_samples": ("-1", "must be >= 0"),
    "data.verify_sha256": ("1", "must be bool"),
    "data.shard_base": ('"/nonexistent/shards"', "not found"),
    "data.cache_dir": ('"/dev/null/cache"', "is not a folder"),
    "data.cache_limit_gb": ("-1", "must be >= 0"),
    "data.prefetch": ('"no"', "must be bool"),
    "data.fetch_concurrency": ("0", "must be >= 1"),
    "data.fetch_retries": ("-1", "must be >= 0"),
    "optimizer.name": ('"sgd"', "is not allowed"),
    "optimizer.lr": ("0", "must be a positive number"),
    "optimizer.betas": ("[0.9, 1.0]", "two numbers in [0, 1)"),
    "optimizer.eps": ("0", "must be positive"),
    "optimizer.weight_decay": ("-0.1", "must be >= 0"),
    "optimizer.implementation": ('"cuda"', "is not allowed"),
    "schedule.warmup": ("-1", "must be >= 0"),
    "schedule.decay": ('"cosine"', "is not allowed"),
    "schedule.power": ("0", "must be positive"),
    "schedule.min_lr_ratio": ("2", "must be in [0, 1]"),
    "train.steps": ("0", "must be positive"),
    "train.global_batch_size": ("0", "must be positive"),
    "train.micro_batch_size": ("0", "must be positive"),
    "train.deepspeed": ('"zero9_fp32"', "no such file"),
    "train.seed": ("-1", "must be in [0, 4294967295]"),
    "train.init_from": ('"/nonexistent/phase1"', "no such run or checkpoint folder"),
    "train.max_loss_scale_skips": ("0", "must be positive"),
    "train.check_every": ("0", "must be positive"),
    "eval.every": ("-1", "must be >= 0"),
    "eval.samples": ("-1", "must be >= 0"),
    "eval.micro_batch_size": ("-1", "must be >= 0"),
    "eval.at_start": ('"yes"', "must be bool"),
    "checkpoint.every": ("-1", "must be >= 0"),
    "checkpoint.keep": ("1", "must be at least 2"),
    "checkpoint.at_end": ("0", "must be bool"),
    "checkpoint.check_free_space": ('"no"', "must be bool"),
    "logging.every": ("0", "must be positive"),
    "logging.progress": ('"fancy"', "is not allowed"),
    "logging.wandb": ('"maybe"', "must be bool"),
    "logging.wandb_project": ('"team/bert"', "W&B"),
    "logging.wandb_mode": ('"cloud"', "is not allowed"),
    "logging.tensorboard": ("1", "must be bool"),
    "logging.peak_tflops": ("-1", "must be >= 0"),
    "fast.unpad": ('"on"', "must be bool"),
    "fast.checkpoint_activations": ("2", "must be bool"),
    "fast.compile": ('"x"', "must be bool"),
    "fast.tf32": ("0", "must be bool"),
    "fast.pad_vocab_multiple": ("0", "must be positive"),
    "debug.nan_loss_at_step": ("-1", "must be >= 0"),
    "debug.overflow_at_steps": ("[0]", "positive step numbers"),
    "debug.forbid_host_syncs": ('"yes"', "must be bool"),
}

# Fields no recipe sets (derived by the loader) and the sections themselves (walked into).
NOT_SETTABLE = {"vocab_size_explicit"}


def recipe_keys() -> list[tuple[str, type]]:
    """Every leaf field of PretrainRecipe, as the dotted key a recipe or --set names, with its
    type."""
    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif f.name not in NOT_SETTABLE:
                keys.append((f"{prefix}{f.name}", tp))
    walk(config_lib.PretrainRecipe, "")
    return keys


def float_cases() -> list[tuple[str, str, str]]:
    """(key, value, name the refusal gives) for NaN and infinity in every float field; a
    list of floats gets them as its second item."""
    cases = []
    for key, tp in recipe_keys():
        args = typing.get_args(tp)
        for bad in ("nan", "inf"):
            if tp is float or (float in args and typing.get_origin(tp) not in (tuple, list)):
                cases.append((key, bad, key))
            elif float in args:
                cases.append((key, f"[0.5, {bad}]", f"{key}[1]"))
    return cases


def test_every_field_has_a_bad_value():
    """A field without an entry here has no proof that a bad value is refused before start."""
    walked = {k for k, _ in recipe_keys()}
    assert walked - set(BAD) == set(), "add a bad value (and its validation) for these fields"
    assert set(BAD) - walked == set(), "these entries name no field any more"
    # Every recipe dataclass is reached by the walk (a new section must be wired in too).
    sections = {tp for _, tp in typing.get_type_hints(config_lib.PretrainRecipe).items()
                if dataclasses.is_dataclass(tp)}
    modules = (config_lib.model, config_lib.optim, config_lib.pretrain)  # the recipe's classes
    defined = {v for m in modules for v in vars(m).values() if dataclasses.is_dataclass(v)
               and v.__module__ == m.__name__} - {config_lib.PretrainRecipe}
    assert defined <= sections, defined - sections


def _refused(manifest, tmp_path, monkeypatch, capsys, key: str, value: str) -> str:
    from bertscale import distributed
    from bertscale.cli import main

    def reached(*a, **k):
        raise AssertionError(f"--set {key}={value} reached the process group")

    monkeypatch.setattr(distributed, "init", reached)
    monkeypatch.setattr(distributed, "init_torch", reached)
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "tiny_ci", "--set", f"data.manifest={json.dumps(str(manifest))}",
            "--set", f"{key}={value}"]
    if key != "run_dir":
        args += ["--run-dir", str(tmp_path / "run")]
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (key, value, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("bertscale pretrain: error: "), err
    assert key in lines[0], err
    return lines[0]


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_of_each_field_is_refused_in_one_line(manifest, tmp_path, monkeypatch, capsys,
                                                          key):
    value, text = BAD[key]
    line = _refused(manifest, tmp_path, monkeypatch, capsys, key, value)
    assert text in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("key, value, name", float_cases())
def test_nan_and_infinity_are_refused_in_every_float_field(manifest, tmp_path, monkeypatch,
                                                           capsys, key, value, name):
    line = _refused(manifest, tmp_path, monkeypatch, capsys, key, value)
    assert f"{name} must be a finite number, got {value.strip('[]').split()[-1]}" in line, line
