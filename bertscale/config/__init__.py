"""Typed configuration: dataclasses with a docstring under each field (docs/configuration.md is
generated from them), presets, TOML recipes and `--set` overrides. Validation happens here, before
any process group starts, and every error names the field and what would be accepted.

schema.py: dataclasses from plain data, overrides, TOML; model.py: the encoder's shape and
presets; optim.py: optimizer and schedule; pretrain.py: the pretraining recipe.
"""

from bertscale.config.model import (HEADS, PRESETS, ModelConfig, model_config_from,
                                    padded_vocab_size, preset)
from bertscale.config.optim import OptimizerConfig, ScheduleConfig, warmup_steps
from bertscale.config.pretrain import (MAX_SEED, CheckpointSection, DataSection, DebugSection,
                                       EvalSection, FastSection, LoggingSection, PretrainRecipe,
                                       TrainSection, load_pretrain_recipe, recipe_to_dict)
from bertscale.config.schema import (apply_overrides, builtin_recipe, from_dict, load_toml,
                                     parse_override, to_dict)

__all__ = ["HEADS", "MAX_SEED", "PRESETS", "CheckpointSection", "DataSection", "DebugSection",
           "EvalSection", "FastSection", "LoggingSection", "ModelConfig", "OptimizerConfig",
           "PretrainRecipe", "ScheduleConfig", "TrainSection", "apply_overrides",
           "builtin_recipe", "from_dict", "load_pretrain_recipe", "load_toml",
           "model_config_from", "padded_vocab_size", "parse_override", "preset",
           "recipe_to_dict", "to_dict", "warmup_steps"]
