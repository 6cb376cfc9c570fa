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

from bertscale.config import HEADS
from bertscale.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bertscale.hf import export_hf, load_hf_folder  # torch: not needed to build the parser
    source: Path = args.source
    if not source.exists():
        from bertscale.pretrained import not_found
        raise not_found(source)
    if args.out.exists() and not args.overwrite:   # before reading a checkpoint of gigabytes
        raise UserError(f"{args.out}: already exists; choose a new folder or pass --overwrite "
                        f"to replace it")
    if (source / "config.json").is_file():
        ckpt = load_hf_folder(source)
        cfg, state, vocab, lowercase = ckpt.config, ckpt.state_dict, ckpt.vocab_path, ckpt.lowercase
        architecture = args.architecture or ckpt.architecture
        what = f"Hugging Face {ckpt.architecture}"
    else:
        # Imported here: the checkpoint module pulls in DeepSpeed, which an HF-to-HF export
        # does not need.
        from bertscale.training.checkpoint.consolidated import load_consolidated

        model = load_consolidated(source)
        cfg, state, vocab, lowercase = (model.config, model.state_dict, model.vocab_path,
                                        model.lowercase)
        architecture = args.architecture or "BertForPreTraining"
        what = f"bertscale checkpoint (step {model.step})"
    out = export_hf(state, cfg, vocab, lowercase, args.out, architecture=architecture,
                    overwrite=args.overwrite, source=str(source))
    print(f"exported {what} from {source} as {architecture} "
          f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{'uncased' if lowercase else 'cased'}) to {out}")
    return 0
