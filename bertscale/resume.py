"""Resuming a run: the one path from a committed checkpoint to a training engine.

Two halves, because the first must run before any process group exists and the second after:

    point = find(run_dir, mode, identity)        # plan time: pick the checkpoint, refuse a
                                                 # different tokenizer / data / model shape
    engine, start = restore(point, ..., build,   # train time, every rank: convert to universal
                            components)          # if the world size changed, build the engine
                                                 # with the matching config, load, repair, RNG,
                                                 # then each component's own state

`restore` is the only code in bertscale that loads an engine checkpoint (fine-tuning and export
read consolidated weights through `checkpoint.load_consolidated`, without an engine). It exists
as one function because the pieces belong together: a universal load needs a different DeepSpeed
config *before* `deepspeed.initialize`, DeepSpeed 0.19's ZeRO-3 universal loader must be repaired
*right after* the load (`elastic.repair_universal_load`), and the RNG streams can be restored only
when the ranks are the ones that saved them. When these lived in two places, the trainer lost
the repair and an elastic ZeRO-3 resume trained with weight decay on biases and a doubled Adam
step count, silently.

What a resume restores: model weights, optimizer state (moments, step counts, every param
group's hyperparameters), the LR schedule, each stateful component's own state through its
`load_state_dict` (the loop's step and skip count; the loader's global data position,
`consumed_samples`, world-size independent) and, at the same world size, every rank's Python /
NumPy / torch RNG state. At another world size the RNG streams cannot be mapped onto the new
ranks; each rank is reseeded from (seed, step, rank), so the resumed run is reproducible but its
dropout masks differ from the uninterrupted run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from bertscale import checkpoint as ckpt_lib
from bertscale.config import ModelConfig
from bertscale.errors import ConfigError, UserError
from bertscale.seeding import seed_all


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
    """What makes a checkpoint this run's: a resume with anything else is refused."""

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

    checkpoint: ckpt_lib.Committed
    state: dict[str, Any]
    changes: tuple[str, ...] = ()
    """Recipe keys that differ from the checkpoint's ("train.steps 80 -> 84"): the recipe's
    value holds from the first resumed step on."""
    layout_change: str | None = None
    """"ZeRO-2 fp32 -> ZeRO-3 bf16" when the engine differs from the one that saved: the
    checkpoint is then loaded through its universal conversion."""

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def component_state(self, name: str) -> dict[str, Any]:
        """The saved state of the trainer component `name`: "train" (the loop's counters, at the
        top level of the file) or "data" (the loader's state dict; checkpoints written before it
        was stored whole hold only its position, as the top-level `consumed_samples`)."""
        if name == "train":
            return self.state
        if name == "data":
            return self.state.get("data") or {"consumed_samples": self.state.get("consumed_samples")}
        raise KeyError(name)

    @property
    def consumed_samples(self) -> int:
        return int(self.component_state("data")["consumed_samples"])

    @property
    def saved_world_size(self) -> int:
        return int(self.checkpoint.marker.get("world_size") or self.state.get("world_size") or 0)


@dataclass(frozen=True)
class Start:
    """Where training starts: step 0, or what a checkpoint restored."""

    step: int = 0
    resumed_from: ckpt_lib.Committed | None = None
    saved_world_size: int | None = None
    universal: bool = False
    """True when the checkpoint was written at another world size (or by another ZeRO stage or
    precision) and loaded through its universal copy."""
    changes: tuple[str, ...] = ()
    """`ResumePoint.changes`: what the recipe changed, for the opening lines."""
    layout_change: str | None = None


def find(run_dir: Path, mode: str, identity: Identity) -> ResumePoint | None:
    """The newest committed checkpoint of `run_dir` if this run should continue it (`mode` auto /
    require / never), after refusing one written with another tokenizer, manifest or model shape.
    No process group needed: every rank reaches the same verdict from the same files."""
    if mode not in ("auto", "require", "never"):
        raise ConfigError(f"--resume {mode!r}: choose auto, require or never")
    latest = ckpt_lib.latest_committed(run_dir)
    if mode == "never" and latest is not None:
        raise UserError(f"{run_dir}: already holds committed checkpoints (newest step {latest.step}); "
                        f"choose another --run-dir or --resume auto")
    if mode == "require" and latest is None:
        raise UserError(f"{run_dir}: --resume require, but there is no committed checkpoint")
    if latest is None:
        return None
    state = ckpt_lib.read_state(latest)
    where = str(latest.path)
    ckpt_lib.check_compatible(state, tokenizer_hash=identity.tokenizer_hash,
                              manifest_fingerprint=identity.manifest_fingerprint,
                              model_config=identity.model_config, where=where)
    changes: tuple[str, ...] = ()
    if identity.recipe is not None and isinstance(state.get("recipe"), dict):
        changes = _recipe_changes(state["recipe"], identity.recipe, where)
    point = ResumePoint(latest, state, changes, _layout_change(state, identity, where))
    data = state.get("data")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{latest.path / ckpt_lib.STATE_FILE}: data is not an object ({data!r})")
    for key, holder in (("step", state), ("consumed_samples", point.component_state("data"))):
        if not isinstance(holder.get(key), int) or holder[key] < 0:
            raise UserError(f"{latest.path / ckpt_lib.STATE_FILE}: {key} is missing or not a "
                            f"non-negative integer ({holder.get(key)!r})")
    return point


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


def _layout_change(state: dict[str, Any], identity: Identity, where: str) -> str | None:
    """"ZeRO-2 fp32 -> ZeRO-3 bf16" when this run's engine differs from the one that saved (the
    resume then goes through a universal conversion), None when it is the same or unknown."""
    saved_stage, saved_precision = state.get("zero_stage"), state.get("precision")
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
                        f"({state.get('deepspeed_config')}), or start a new run folder with "
                        f"train.init_from")
    return change


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def restore(point: ResumePoint | None, ds_config: dict[str, Any],
            build: Callable[[dict[str, Any]], Any], components: Mapping[str, Stateful], *,
            rank: int, world_size: int, seed: int,
            check_free_space: bool = True) -> tuple[Any, Start]:
    """Build the engine (`build(ds_config)` returns whatever `deepspeed.initialize` returned, the
    engine first) and, with a resume point, load it and every component of `components` ("train",
    "data": see `ResumePoint.component_state`) from its saved state. Collective: every rank
    calls it. `check_free_space`: the recipe's checkpoint.check_free_space, for the universal
    conversion a resume may need.

    Fresh start: each rank is seeded with its own dropout stream after the model exists (the
    caller seeds the initialisation identically on every rank before building the model)."""
    if point is None:
        built = build(ds_config)
        seed_all(seed + 1 + rank)
        return built, Start()

    from bertscale import elastic

    ckpt = point.checkpoint
    # Converts once if the world size, the ZeRO stage or the precision changed.
    source = elastic.resume_source(ckpt.root, ckpt.tag, world_size,
                                   engine_changed=point.layout_change is not None,
                                   check_free_space=check_free_space)
    if source.universal:
        ds_config = elastic.with_load_universal(ds_config)
    built = build(ds_config)
    engine = built[0] if isinstance(built, tuple) else built
    load_engine_state(engine, source, where=ckpt.path)
    if source.universal:
        seed_all(seed + 7919 * (point.step + 1) + rank)
    else:
        ckpt_lib.restore_rng(ckpt, rank)
    for name, component in components.items():
        component.load_state_dict(point.component_state(name))
    return built, Start(point.step, ckpt, source.saved_world_size, source.universal,
                        point.changes, point.layout_change)


def load_engine_state(engine: Any, source: Any, *, where: str | Path | None = None) -> dict[str, Any]:
    """`engine.load_checkpoint` of an `elastic.ResumeSource` (model, optimizer, LR schedule), then
    the repair of DeepSpeed's ZeRO-3 universal load, then today's recipe put back in force: the
    loaded schedule keeps only its step counter; the lr of the next update and every param
    group's hyperparameters are the recipe's (`optim.follow_recipe_after_load`). Collective.
    Returns DeepSpeed's client state."""
    from bertscale import elastic, optim

    scheduler = getattr(engine, "lr_scheduler", None)
    recipe_groups = optim.recipe_hyperparameters(scheduler.optimizer) if scheduler else None
    path, client = engine.load_checkpoint(str(source.load_dir), tag=source.tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{where or Path(source.load_dir) / source.tag}: DeepSpeed could not load "
                        f"this checkpoint")
    elastic.repair_universal_load(engine, source)
    if scheduler is not None:
        optim.follow_recipe_after_load(scheduler, recipe_groups)
    return client or {}
