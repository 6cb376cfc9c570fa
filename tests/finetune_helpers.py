"""What the fine-tuning tests share: a tiny checkpoint and the `bertscale finetune` parser."""

from __future__ import annotations

import argparse
from pathlib import Path


def tiny_hf_checkpoint(folder: Path, vocab: Path, lowercase: bool = True) -> Path:
    """A random 2-layer BERT written as a Hugging Face folder by our exporter."""
    import torch

    from bertscale.config import ModelConfig
    from bertscale.hf import export_hf
    from bertscale.model import BertForPreTraining
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512)
    return export_hf(BertForPreTraining(cfg).state_dict(), cfg, vocab, lowercase, folder)


def finetune_cli(argv: list[str]) -> int:
    """`bertscale <argv>` through the fine-tuning parser, in this process; a UserError is raised
    (not turned into an exit status) so that tests can match its message."""
    from bertscale.commands.finetune import register
    parser = argparse.ArgumentParser(prog="bertscale")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)
