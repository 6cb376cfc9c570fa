"""`bertscale embed`: contextual features from a frozen BERT, the paper's feature-based approach
(Devlin et al. 2018, Section 5.3: features from the frozen model feed a task model; concatenating
the last four layers scored 96.1 CoNLL-2003 dev F1 against 96.4 for fine-tuning).

Input, read as a stream: plain text (one record per line), JSON lines (`--field NAME`: a string,
or a list of words), or TSV (`--column N` 0-based, or `--column NAME` with a header line); `.gz`
files are read as is. Blank lines are not records. A record's id is its 0-based line number in
the input file, so features join back to the input whatever was skipped.

Layers (`--layers`, the ablation of the paper's Table 7; hidden_states[0] is the embedding output):
  embeddings        hidden_states[0]
  last              the last layer
  second-to-last    the one before it
  sum-last-four     element-wise sum of the last four layers
  concat-last-four  [last, second-to-last, third-to-last, fourth-to-last] concatenated (4H wide)
  weighted-sum      sum over the L encoder layers of w_l * h_l; `--layer-weights` gives L weights,
                    uniform 1/L otherwise (the paper's "weighted sum of all 12 layers")
  N (an integer)    hidden_states[N]; negative counts from the last
Pooling (`--pooling`): `cls` (the [CLS] vector), `mean` (mean over the real tokens, [CLS] and
[SEP] included, padding excluded, as sentence-transformers pools), or `first-subtoken` (one vector
per word: the first word piece of each whitespace-separated word, or of each item of a JSON list
field, as the paper's NER tagger reads BERT).

Output folder: manifest.json (checkpoint, layers, pooling, dim, dtype, world size, counts, and the
shards in order; `bertscale.embed.load_features(folder)` reads it back in input order) and the
shards: `--format npy` (features, ids and per word offsets as .npy), `safetensors` or `wds` (a
WebDataset tar, one sample per record). A shard closes at --shard-size records or --shard-mb of
features, whichever comes first.

Several processes or GPUs (torchrun, the deepspeed launcher, mpirun, srun): rank r of W embeds
records r, r+W, r+2W, ... on cuda:<local rank mod GPUs> (or the CPU) and writes its own shards;
the output folder appears complete once every rank is done, or not at all. Limits:
docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertscale.commands.args import Subparsers, parse_list
from bertscale.embed import OUTPUT_FORMATS, POOLINGS
from bertscale.features import LAYER_NAMES


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="contextual features from a frozen BERT (the feature-based approach)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a Hugging Face BERT folder or a bertscale run / checkpoint folder")
    p.add_argument("--input", type=Path, required=True,
                   help="text (a record per line), JSON lines (--field) or TSV (--column); .gz ok")
    p.add_argument("--output-dir", type=Path, required=True, help="the features folder to create")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--field", help="JSON lines: the key holding the text or the word list")
    src.add_argument("--column", help="TSV: 0-based column index, or a header column name")
    p.add_argument("--skip-header", action="store_true",
                   help="TSV with a numeric --column: the first line is a header")
    p.add_argument("--layers", default="last",
                   help=f"{', '.join(LAYER_NAMES)}, or a hidden-state index (default: last)")
    p.add_argument("--layer-weights", help="weighted-sum: one comma-separated weight per layer")
    p.add_argument("--pooling", default="cls", choices=POOLINGS)
    p.add_argument("--max-seq-length", type=int,
                   help="word pieces per sequence (default: min(512, the model's maximum))")
    p.add_argument("--batch-size", type=int, default=64, help="records per forward pass")
    p.add_argument("--shard-size", type=int, default=100_000, help="records per output shard")
    p.add_argument("--shard-mb", type=int, default=1024,
                   help="also start a new shard once one holds this many MiB of features")
    p.add_argument("--format", dest="output_format", default="npy", choices=OUTPUT_FORMATS)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on a GPU that has it, fp32 on the CPU")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:<local rank> when there is a GPU), cpu, cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (once the new one is complete)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a rank waits for the others at a barrier")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    p.add_argument("--unpad", action="store_true",
                   help="fast path: run the encoder on the real tokens only (same features)")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from bertscale.embed import EmbedConfig, InputSpec, run

    weights = (parse_list(args.layer_weights, float, "--layer-weights")
               if args.layer_weights else None)
    run(EmbedConfig(
        checkpoint=args.checkpoint,
        input=InputSpec(args.input, args.field, args.column, args.skip_header),
        output_dir=args.output_dir, layers=args.layers, layer_weights=weights,
        pooling=args.pooling, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
        shard_size=args.shard_size, shard_mb=args.shard_mb, output_format=args.output_format,
        dtype=args.dtype, precision=args.precision, device=args.device,
        overwrite=args.overwrite, timeout_s=args.timeout, progress=args.progress,
        unpad=args.unpad))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m bertscale.commands.embed ...`: the command without the other commands' imports."""
    from bertscale.commands import run_subcommand
    return run_subcommand("embed", argv)


if __name__ == "__main__":
    sys.exit(main())
