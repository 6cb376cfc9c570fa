"""The trainer-state file of a checkpoint (`trainer_state.json`, written by rank 0), laid out by
component:

    {"format": 2,
     "components": {"train": {"step": 30, "skipped_steps": 0},      # the loop's counters
                    "data": {"consumed_samples": 480, ...}},         # the data position
     "run": {"recipe": ..., "model_config": ..., ...}}               # what identifies the run

Each stateful component gets back exactly the dict it saved, under its own name. "run" is what
a resume compares to refuse continuing another run (bertscale.training.checkpoint.resume). The
checkpoint's step and world size are its commit marker's, not repeated here.

Format 1 (bertscale before the trainer core) kept the counters, the data position and the run's
identity side by side at the top level; it is read into the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import write_json_atomic
from bertscale.training.checkpoint.layout import STATE_FILE, Committed

FORMAT = 2
_FORMAT1_COUNTERS = ("step", "skipped_steps")
_FORMAT1_FACTS = ("step", "skipped_steps", "consumed_samples", "data", "world_size", "format")


@dataclass(frozen=True)
class TrainerState:
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str, where: str) -> dict[str, Any]:
        """The saved state of component `name`; a checkpoint without it is refused."""
        state = self.components.get(name)
        if not isinstance(state, dict):
            raise UserError(f"{where}: holds no state of the trainer's {name!r} component "
                            f"(it has: {', '.join(sorted(self.components)) or 'none'})")
        return state

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "components": self.components, "run": self.run}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TrainerState:
        if not isinstance(data, dict):
            raise UserError(f"{where}: not a JSON object")
        if data.get("format") == FORMAT:
            components, run = data.get("components"), data.get("run")
            if not isinstance(components, dict) or not isinstance(run, dict):
                raise UserError(f"{where}: components and run must be JSON objects")
            return cls(components, run)
        # Format 1: everything at the top level.
        data_state = data.get("data")
        if data_state is not None and not isinstance(data_state, dict):
            raise UserError(f"{where}: data is not an object ({data_state!r})")
        components = {"train": {k: data[k] for k in _FORMAT1_COUNTERS if k in data},
                      "data": data_state or {"consumed_samples": data.get("consumed_samples")}}
        return cls(components, {k: v for k, v in data.items() if k not in _FORMAT1_FACTS})


def write_state(folder: Path, state: TrainerState) -> Path:
    path = folder / STATE_FILE
    write_json_atomic(path, state.to_json())
    return path


def read_state(ckpt: Committed) -> TrainerState:
    path = ckpt.path / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{ckpt.path}: committed but has no {STATE_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return TrainerState.from_json(data, str(path))
