"""`bertscale export`: write a Hugging Face BERT folder that `transformers` loads as is.

    bertscale export --from <run dir | checkpoint dir | HF folder> --to <out dir>

The source is read as a Hugging Face folder when it holds config.json, otherwise as a bertscale
run or checkpoint (the newest committed checkpoint of a run, any ZeRO stage, consolidated in
memory: the whole fp32 model must fit in host RAM, about 1.4 GB for BERT-Large). The output is
written atomically; an existing output folder is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bertscale.commands.args import Subparsers
from bertscale.config import HEADS


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a Hugging Face BERT folder from a run, checkpoint or HF folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, type=Path,
                   help="a bertscale run folder, one of its checkpoint folders, or a Hugging "
                        "Face BERT folder (config.json + weights + vocab.txt)")
    p.add_argument("--to", dest="out", required=True, type=Path, help="output folder")
    p.add_argument("--architecture", choices=list(HEADS), default=None,
                   help="Hugging Face class to export as (default: BertForPreTraining for a "
                        "bertscale checkpoint, the source's own for a Hugging Face folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from bertscale.export import export

    done = export(args.source, args.out, args.architecture, args.overwrite)
    cfg = done.config
    print(f"exported {done.source} from {args.source} as {done.architecture} "
          f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{'uncased' if done.lowercase else 'cased'}) to {done.out}")
    return 0
