"""Resuming a run: the one path from a committed checkpoint to a training engine.

Two halves, because the first must run before any process group exists and the second after:

    point = find(run_dir, mode)                  # plan time: pick the checkpoint, read its state
    point = check_identity(point, identity)      # (pretraining) refuse another tokenizer, data,
                                                 # model shape, sample stream or optimizer
    engine, start = restore(point, factory,      # train time, every rank: the engine built for
                            components, ...)     # the checkpoint's form (universal if the world
                                                 # size or the ZeRO stage changed), loaded,
                                                 # repaired, RNG, then each component's own state

`restore` is the only code in bertscale that loads an engine checkpoint (fine-tuning from a
pretraining run and export read consolidated weights, bertscale.training.checkpoint.consolidated,
without an engine). It exists as one function because the pieces belong together: a universal
load needs a different DeepSpeed config *before* `deepspeed.initialize`, DeepSpeed 0.19's ZeRO-3
universal loader must be repaired *right after* the load (universal.repair_universal_load, inside
the DeepSpeed engine's load), and the RNG streams can be restored only when the ranks are the
ones that saved them. When these lived in two places, the trainer lost the repair and an elastic
ZeRO-3 resume trained with weight decay on biases and a doubled Adam step count, silently.

What a resume restores: model weights, optimizer state (moments, step counts, every param
group's hyperparameters), the LR schedule (the recipe's schedule from the restored step on),
each stateful component's own state through its `load_state_dict` (the loop's step and skip
count; the data position, world-size independent) and, at the same world size, every rank's
Python / NumPy / torch RNG state. At another world size the RNG streams cannot be mapped onto the
new ranks; each rank is reseeded from (seed, step, rank), so the resumed run is reproducible but
its dropout masks differ from the uninterrupted run's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from bertscale.config import ModelConfig, to_dict
from bertscale.errors import ConfigError, UserError
from bertscale.seeding import seed_all, set_rng_state
from bertscale.training.checkpoint.layout import STATE_FILE, Committed, latest_committed
from bertscale.training.checkpoint.state import TrainerState, read_state
from bertscale.training.engine import Engine, EngineFactory
from bertscale.training.state import Stateful

E = TypeVar("E", bound=Engine)

# The recipe keys that decide which sample sits at which global position of the stream and how
# it is masked (bertscale.data.loader, bertscale.data.masking). A resume that changes one would
# repeat and skip samples of the current epoch, or mask them otherwise than the run it continues,
# so it is refused like another tokenizer or manifest. Everything else the train loader is given
# is geometry or plumbing (batch sizes, workers, caches, the bad-sample policy) that leaves the
# stream as it was; tests/test_resume_changes.py walks the loader's settings to keep this list
# complete.
STREAM_KEYS: dict[str, str] = {
    "train.seed": "it orders the shards and the samples within each shuffle window and draws "
                  "every mask, so the resumed run would repeat and skip samples",
    "data.mask_prob": "it decides how many tokens of every sample are masked",
    "data.max_predictions_per_seq": "it caps the masked tokens of every sample",
    "data.whole_word_masking": "it decides which tokens of every sample are masked",
}


@dataclass(frozen=True)
class Identity:
    """What makes a pretraining checkpoint this run's: a resume with anything else is refused."""

    tokenizer_hash: str
    manifest_fingerprint: str
    model_config: ModelConfig
    recipe: dict[str, Any] | None = None
    """The run's recipe now (`config.recipe_to_dict`): compared with the checkpoint's."""
    zero_stage: int | None = None
    precision: str | None = None
    """The engine this run builds; another stage or precision than the checkpoint's is loaded
    through a universal conversion."""


@dataclass(frozen=True)
class ResumePoint:
    """A committed checkpoint this run continues from, and its trainer state."""

    checkpoint: Committed
    state: TrainerState
    changes: tuple[str, ...] = ()
    """Recipe keys that differ from the checkpoint's ("train.steps 80 -> 84"): the recipe's
    value holds from the first resumed step on."""
    layout_change: str | None = None
    """"ZeRO-2 fp32 -> ZeRO-3 bf16" when the engine differs from the one that saved: the
    checkpoint is then loaded through its universal conversion."""

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def component_state(self, name: str) -> dict[str, Any]:
        """The saved state of the trainer component `name`."""
        return self.state.component(name, str(self.checkpoint.path / STATE_FILE))


@dataclass(frozen=True)
class Start:
    """Where training starts: step 0, or what a checkpoint restored."""

    step: int = 0
    resumed_from: Committed | None = None
    saved_world_size: int | None = None
    universal: bool = False
    """True when the checkpoint was written at another world size (or by another ZeRO stage or
    precision) and loaded through its universal copy."""
    changes: tuple[str, ...] = ()
    """`ResumePoint.changes`: what the recipe changed, for the opening lines."""
    layout_change: str | None = None


def find(run_dir: Path, mode: str, counters: Mapping[str, tuple[str, ...]] | None = None
         ) -> ResumePoint | None:
    """The newest committed checkpoint of `run_dir` if this run should continue it (`mode` auto /
    require / never), with its trainer state; `counters` names, per component, the keys that
    must be non-negative integers there. No process group needed: every rank reaches the same
    verdict from the same files."""
    if mode not in ("auto", "require", "never"):
        raise ConfigError(f"--resume {mode!r}: choose auto, require or never")
    latest = latest_committed(run_dir)
    if mode == "never" and latest is not None:
        raise UserError(f"{run_dir}: already holds committed checkpoints (newest step {latest.step}); "
                        f"choose another --run-dir or --resume auto")
    if mode == "require" and latest is None:
        raise UserError(f"{run_dir}: --resume require, but there is no committed checkpoint")
    if latest is None:
        return None
    point = ResumePoint(latest, read_state(latest))
    for name, keys in (counters or {}).items():
        holder = point.component_state(name)
        for key in keys:
            if not isinstance(holder.get(key), int) or holder[key] < 0:
                raise UserError(f"{latest.path / STATE_FILE}: {key} is missing or not a "
                                f"non-negative integer ({holder.get(key)!r})")
    return point


def check_identity(point: ResumePoint, identity: Identity) -> ResumePoint:
    """`point` if it is this run's checkpoint, with what the recipe changed since and whether
    the engine did; a checkpoint of another tokenizer, manifest, model shape, sample stream or
    optimizer is refused."""
    run, where = point.state.run, str(point.checkpoint.path)
    check_compatible(run, tokenizer_hash=identity.tokenizer_hash,
                     manifest_fingerprint=identity.manifest_fingerprint,
                     model_config=identity.model_config, where=where)
    changes: tuple[str, ...] = ()
    if identity.recipe is not None and isinstance(run.get("recipe"), dict):
        changes = _recipe_changes(run["recipe"], identity.recipe, where)
    return replace(point, changes=changes, layout_change=_layout_change(run, identity, where))


def check_compatible(run: Mapping[str, Any], *, tokenizer_hash: str,
                     manifest_fingerprint: str | None, model_config: ModelConfig,
                     where: str) -> None:
    """Refuse to continue a checkpoint (its trainer state's "run") with another tokenizer, data
    set or model shape. `manifest_fingerprint=None` skips the data check (phase 2 trains on
    other shards)."""
    if run.get("tokenizer_hash") != tokenizer_hash:
        raise UserError(f"{where}: was trained with another tokenizer (hash "
                        f"{str(run.get('tokenizer_hash'))[:12]}, now {tokenizer_hash[:12]}); "
                        f"resuming would scramble the embeddings")
    if manifest_fingerprint is not None and run.get("manifest_fingerprint") != manifest_fingerprint:
        raise UserError(f"{where}: was trained on another data manifest ({run.get('manifest_path')}, "
                        f"fingerprint {str(run.get('manifest_fingerprint'))[:12]}, now "
                        f"{manifest_fingerprint[:12]}); the data position would be meaningless. "
                        f"Start a new run folder for new data")
    saved = run.get("model_config") or {}
    now = to_dict(model_config)
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act")
    diff = [f"{k} {saved.get(k)} -> {now[k]}" for k in shape if saved.get(k) != now[k]]
    if diff:
        raise UserError(f"{where}: model shape differs from the checkpoint ({'; '.join(diff)})")


def _flat(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.seed": 1234, ...} of a recipe as plain JSON data (a saved one is JSON already)."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def _recipe_changes(saved: dict[str, Any], now: dict[str, Any], where: str) -> tuple[str, ...]:
    """The keys whose change a resume can honour, as "key old -> new"; a change that would make
    the checkpoint's state meaningless (the sample stream, the optimizer) is refused here."""
    old, new = _flat(saved), _flat(now)
    for key, why in STREAM_KEYS.items():
        if key in old and old[key] != new.get(key):
            raise UserError(f"{where}: {key} was {json.dumps(old[key])} in this run, now "
                            f"{json.dumps(new.get(key))}; {why}. Resume with --set "
                            f"{key}={json.dumps(old[key])}, or start a new run folder (its "
                            f"weights: train.init_from)")
    key = "optimizer.name"
    if key in old and old[key] != new.get(key):
        raise UserError(f"{where}: was trained with {key} = {json.dumps(old[key])}, now "
                        f"{json.dumps(new.get(key))}; its optimizer state is {old[key]}'s and "
                        f"cannot continue another optimizer. Resume with --set "
                        f"{key}={json.dumps(old[key])}, or start a new run folder with "
                        f"train.init_from = {json.dumps(where)} (its weights, a fresh optimizer)")
    return tuple(f"{k} {_show(old[k])} -> {_show(new[k])}"
                 for k in sorted(old.keys() & new.keys()) if old[k] != new[k])


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _layout_change(run: Mapping[str, Any], identity: Identity, where: str) -> str | None:
    """"ZeRO-2 fp32 -> ZeRO-3 bf16" when this run's engine differs from the one that saved (the
    resume then goes through a universal conversion), None when it is the same or unknown."""
    saved_stage, saved_precision = run.get("zero_stage"), run.get("precision")
    if (identity.zero_stage is None or saved_stage is None
            or (saved_stage, saved_precision) == (identity.zero_stage, identity.precision)):
        return None
    change = (f"ZeRO-{saved_stage} {saved_precision} -> ZeRO-{identity.zero_stage} "
              f"{identity.precision}")
    if 0 in (saved_stage, identity.zero_stage):
        raise UserError(f"{where}: was saved by a ZeRO-{saved_stage} {saved_precision} engine, this "
                        f"run builds ZeRO-{identity.zero_stage} {identity.precision}; DeepSpeed "
                        f"converts between stages and precisions only among ZeRO stages 1-3. "
                        f"Resume with the checkpoint's DeepSpeed config "
                        f"({run.get('deepspeed_config')}), or start a new run folder with "
                        f"train.init_from")
    return change


def restore(point: ResumePoint | None, factory: EngineFactory[E],
            components: Mapping[str, Stateful], *, rank: int, world_size: int,
            seed: int) -> tuple[E, Start]:
    """Build the engine and, with a resume point, load it and every component of `components`
    from its saved state. Collective: every rank calls it. A fresh start only builds the engine
    (the caller seeds each rank's stream after it)."""
    if point is None:
        return factory.build(None), Start()
    ckpt = point.checkpoint
    # Converts once if the world size, the ZeRO stage or the precision changed.
    source = factory.source(ckpt, engine_changed=point.layout_change is not None)
    engine = factory.build(source)
    engine.load(source)
    if source.universal or source.saved_world_size != world_size:
        seed_all(seed + 7919 * (point.step + 1) + rank)
    else:
        restore_rng(ckpt, rank)
    for name, component in components.items():
        component.load_state_dict(point.component_state(name))
    return engine, Start(point.step, ckpt, source.saved_world_size, source.universal,
                         point.changes, point.layout_change)


def restore_rng(ckpt: Committed, rank: int) -> None:
    """Restore rank `rank`'s RNG states saved with `ckpt` (same world size only)."""
    import torch

    rng_file = ckpt.path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(f"{rng_file}: missing (checkpoint written by {ckpt.world_size} ranks)")
    set_rng_state(torch.load(rng_file, weights_only=False))
