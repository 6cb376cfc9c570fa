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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from bertscale import checkpoint as ckpt_lib
from bertscale.config import ModelConfig
from bertscale.errors import ConfigError, UserError
from bertscale.seeding import seed_all


@dataclass(frozen=True)
class Identity:
    """What makes a checkpoint this run's: a resume with anything else is refused."""

    tokenizer_hash: str
    manifest_fingerprint: str
    model_config: ModelConfig


@dataclass(frozen=True)
class ResumePoint:
    """A committed checkpoint this run continues from, and its trainer state."""

    checkpoint: ckpt_lib.Committed
    state: dict[str, Any]

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
    """True when the checkpoint was written at another world size and loaded through its
    universal copy."""


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
    ckpt_lib.check_compatible(state, tokenizer_hash=identity.tokenizer_hash,
                              manifest_fingerprint=identity.manifest_fingerprint,
                              model_config=identity.model_config, where=str(latest.path))
    point = ResumePoint(latest, state)
    data = state.get("data")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{latest.path / ckpt_lib.STATE_FILE}: data is not an object ({data!r})")
    for key, holder in (("step", state), ("consumed_samples", point.component_state("data"))):
        if not isinstance(holder.get(key), int) or holder[key] < 0:
            raise UserError(f"{latest.path / ckpt_lib.STATE_FILE}: {key} is missing or not a "
                            f"non-negative integer ({holder.get(key)!r})")
    return point


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def restore(point: ResumePoint | None, ds_config: dict[str, Any],
            build: Callable[[dict[str, Any]], Any], components: Mapping[str, Stateful], *,
            rank: int, world_size: int, seed: int) -> tuple[Any, Start]:
    """Build the engine (`build(ds_config)` returns whatever `deepspeed.initialize` returned, the
    engine first) and, with a resume point, load it and every component of `components` ("train",
    "data": see `ResumePoint.component_state`) from its saved state. Collective: every rank
    calls it.

    Fresh start: each rank is seeded with its own dropout stream after the model exists (the
    caller seeds the initialisation identically on every rank before building the model)."""
    if point is None:
        built = build(ds_config)
        seed_all(seed + 1 + rank)
        return built, Start()

    from bertscale import elastic

    ckpt = point.checkpoint
    source = elastic.resume_source(ckpt.root, ckpt.tag, world_size)  # converts once if resized
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
    return built, Start(point.step, ckpt, source.saved_world_size, source.universal)


def load_engine_state(engine: Any, source: Any, *, where: str | Path | None = None) -> dict[str, Any]:
    """`engine.load_checkpoint` of an `elastic.ResumeSource` (model, optimizer, LR schedule), then
    the repair of DeepSpeed's ZeRO-3 universal load. Collective. Returns DeepSpeed's client state."""
    from bertscale import elastic

    path, client = engine.load_checkpoint(str(source.load_dir), tag=source.tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{where or Path(source.load_dir) / source.tag}: DeepSpeed could not load "
                        f"this checkpoint")
    elastic.repair_universal_load(engine, source)
    return client or {}
