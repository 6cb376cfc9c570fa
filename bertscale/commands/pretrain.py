"""`bertscale pretrain`: BERT's masked-LM + next-sentence pretraining through DeepSpeed ZeRO, from a
typed TOML recipe (`--set` overrides, `--list`, `--print-config`)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import textwrap

from bertscale.commands.args import Subparsers
from bertscale.config import PretrainRecipe, load_pretrain_recipe, recipe_to_dict
from bertscale.errors import ConfigError


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain BERT (MLM + NSP) with DeepSpeed ZeRO",
        description="Pretrain BERT from prepared shards. Launch one process per device with "
                    "torchrun, deepspeed, mpirun or srun; a single process needs no launcher.")
    p.add_argument("recipe", nargs="?",
                   help="recipe TOML file, or a built-in recipe name (e.g. tiny_ci; --list "
                        "shows them)")
    p.add_argument("--list", action="store_true",
                   help="list the built-in recipes and model presets, and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (after --set) and the DeepSpeed JSON it "
                        "gives at this world size as one JSON object, and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a recipe field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--run-dir", help="run folder: a local path, or an object-store URL "
                   "(s3://, gs://, az://; checkpoints staged on this node, uploaded and "
                   "committed there: docs/cloud.md) (default: recipe run_dir or runs/<name>)")
    p.add_argument("--resume", choices=("auto", "require", "never"), default="auto",
                   help="auto: continue from the newest committed checkpoint if there is one")
    p.add_argument("--stop-at-step", type=int, help="save and stop after this step (exit 0)")
    p.add_argument("--no-wandb", action="store_true", help="disable Weights & Biases")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device, for MFU")
    p.add_argument("--verbose", action="store_true",
                   help="keep DeepSpeed's own INFO logging and every third-party warning")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    if args.list:
        print(_builtin_listing())
        return 0
    if args.recipe is None:
        raise ConfigError("give a recipe (a TOML file or a built-in name); "
                          "`bertscale pretrain --list` shows the built-in ones")
    overrides = list(args.overrides)
    if args.no_wandb:
        overrides.append("logging.wandb=false")
    if args.tensorboard:
        overrides.append("logging.tensorboard=true")
    if args.peak_tflops is not None:
        overrides.append(f"logging.peak_tflops={args.peak_tflops}")
    recipe = load_pretrain_recipe(args.recipe, overrides)
    if args.stop_at_step is not None and args.stop_at_step <= 0:
        raise ConfigError(f"--stop-at-step must be positive, got {args.stop_at_step}")
    if args.print_config:
        print(_resolved_config(recipe))
        return 0
    quiet_deepspeed(args.verbose)
    from bertscale.pretraining.train import run
    return run(recipe, run_dir=args.run_dir, resume=args.resume, stop_at_step=args.stop_at_step)


def _builtin_listing() -> str:
    """`pretrain --list`: each built-in recipe with the first line of its comment, then the
    model presets with their shapes."""
    from bertscale.config import PRESETS, builtin_recipe, preset
    folder = builtin_recipe("tiny_ci").parent
    lines = ["built-in recipes (bertscale pretrain NAME; files in bertscale/recipes/):"]
    width = max(60, shutil.get_terminal_size().columns - 1)
    for path in sorted(folder.glob("*.toml")):
        lines += textwrap.wrap(_first_sentence(path.read_text()), width,
                               initial_indent=f"  {path.stem:<20} ", subsequent_indent=" " * 23,
                               break_on_hyphens=False)
    lines.append("model presets (model.preset = NAME):")
    for name in PRESETS:
        c = preset(name)
        lines.append(f"  {name:<20} L={c.num_hidden_layers} H={c.hidden_size} "
                     f"A={c.num_attention_heads} intermediate={c.intermediate_size}")
    return "\n".join(lines)


def _first_sentence(toml_text: str) -> str:
    """The first sentence of a recipe's opening comment (its first paragraph if no sentence
    ends in it): what `--list` says about the recipe, never cut mid-sentence."""
    para: list[str] = []
    for line in toml_text.splitlines():
        text = line[1:].strip() if line.startswith("#") else None
        if not text or line.startswith("#   "):  # a blank comment line, code, or an example
            if para or text is None:
                break
            continue
        para.append(text)
    joined = " ".join(para)
    # A sentence ends at . ! ? before a capital, a digit or a quote; "et al. 2018" and "e.g. X"
    # do not end one.
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s+[A-Z0-9`\"(])", joined)
    return joined[:end.end()] if end else joined


def _resolved_config(recipe: PretrainRecipe) -> str:
    """`pretrain --print-config`: the recipe as the run would use it and its DeepSpeed JSON
    (batch fields injected for the world size a launcher gives, 1 alone)."""
    import torch

    from bertscale import distributed
    from bertscale.pretraining.plan import deepspeed_config
    world = distributed.discover().world_size
    ds, path, _, _, _ = deepspeed_config(recipe, world, torch.cuda.is_available())
    return json.dumps({"recipe": recipe_to_dict(recipe), "world_size": world,
                       "deepspeed_config_file": str(path), "deepspeed": ds}, indent=2, default=str)


def quiet_deepspeed(verbose: bool = False) -> None:
    """DeepSpeed logs every setting at INFO on every rank; keep warnings only unless asked."""
    import logging

    from bertscale.reporting import quiet_third_party
    quiet_third_party(verbose)
    if not verbose:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.pretrain ...`: the command without the other commands' imports."""
    from bertscale.commands import run_subcommand
    return run_subcommand("pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
