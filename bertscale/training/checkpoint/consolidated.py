"""A checkpoint's full weights in one process, without an engine or a process group: for
fine-tuning, export and feature extraction from a pretraining run.

`load_consolidated` merges the fp32 weights of any ZeRO stage on the CPU (DeepSpeed's
zero_to_fp32; ZeRO-0 keeps them whole in its model-states file). A file that cannot be read is
named in one line with the older committed checkpoint to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bertscale.config import ModelConfig, from_dict
from bertscale.errors import UserError
from bertscale.training.checkpoint.layout import (STATE_FILE, VOCAB_FILE, Committed,
                                                  older_committed, resolve)
from bertscale.training.checkpoint.state import read_state

if TYPE_CHECKING:
    import torch


@dataclass
class ConsolidatedModel:
    """Full fp32 weights of a checkpoint, with what is needed to use them."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    """BertForPreTraining keys (the tied decoder weight included), fp32 CPU tensors."""
    vocab_path: Path
    lowercase: bool
    step: int


def load_consolidated(path: str | Path) -> ConsolidatedModel:
    """Weights of the newest committed checkpoint of a run folder (or of one checkpoint folder),
    merged from any ZeRO stage on the CPU, without a process group."""
    ckpt = resolve(path)
    run = read_state(ckpt).run
    config = from_dict(ModelConfig, run["model_config"], f"{ckpt.path / STATE_FILE}: model_config")
    sd = _fp32_weights(ckpt)
    # zero_to_fp32 restores tied parameters under every name; add the decoder if it was dropped.
    if "cls.predictions.decoder.weight" not in sd and "bert.embeddings.word_embeddings.weight" in sd:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    vocab = ckpt.run_dir / VOCAB_FILE
    if not vocab.is_file():
        raise UserError(f"{vocab}: the run folder has lost its vocabulary")
    return ConsolidatedModel(config, sd, vocab, bool(run.get("lowercase", True)), ckpt.step)


def _fp32_weights(ckpt: Committed) -> dict[str, torch.Tensor]:
    import torch

    from bertscale.reporting import third_party_output

    zero_files = list(ckpt.path.glob("*zero_pp_rank_*optim_states.pt"))
    # Its "Processing zero checkpoint ..." lines, shown with --verbose, or when the reading
    # fails for another reason than a damaged file.
    with third_party_output():
        try:
            if zero_files:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                sd: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(
                    str(ckpt.root), tag=ckpt.tag)
            else:  # ZeRO-0: the model states file holds the full weights
                model_file = ckpt.path / "mp_rank_00_model_states.pt"
                if not model_file.is_file():
                    raise UserError(f"{ckpt.path}: no DeepSpeed model states file")
                sd = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        except UserError:
            raise
        except Exception as e:
            damaged = _damaged_file(ckpt)
            if damaged is None:
                raise   # every file opens: not a damaged checkpoint but a fault of ours
            raise UserError(f"{damaged[0]}: cannot be read ({damaged[1]}): checkpoint step "
                            f"{ckpt.step} is damaged{older_committed(ckpt)}") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _damaged_file(ckpt: Committed) -> tuple[Path, str] | None:
    """The first of the checkpoint's torch files that does not open (cut short, overwritten),
    with why; None when they all do. Opening maps the file and reads its zip directory only."""
    import torch

    for f in sorted(ckpt.path.glob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            first = (str(e).splitlines() or [""])[0][:200]
            return f, f"{type(e).__name__}: {first}"
    return None


__all__ = ["ConsolidatedModel", "load_consolidated"]
