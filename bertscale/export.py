"""A Hugging Face BERT folder that `transformers` loads as is, from a bertscale run or checkpoint
(the newest committed checkpoint of a run, any ZeRO stage, consolidated in memory: the whole
fp32 model must fit in host RAM, about 1.4 GB for BERT-Large) or from another Hugging Face
folder. The output is written atomically; an existing folder is replaced only when asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertscale.config import ModelConfig
from bertscale.errors import UserError


@dataclass
class Exported:
    """What `export` wrote, for its report."""

    out: Path
    architecture: str
    source: str
    """What was read: "Hugging Face <class>" or "bertscale checkpoint (step N)"."""
    config: ModelConfig
    lowercase: bool


def export(source: Path, out: Path, architecture: str | None = None,
           overwrite: bool = False) -> Exported:
    """Write `source` (a run, checkpoint or Hugging Face folder) to `out` as `architecture`
    (default: BertForPreTraining for a bertscale checkpoint, the source's own for a Hugging Face
    folder)."""
    from bertscale.hf import export_hf, load_hf_folder  # torch: only when an export runs
    if not source.exists():
        from bertscale.pretrained import not_found
        raise not_found(source)
    if out.exists() and not overwrite:   # before reading a checkpoint of gigabytes
        raise UserError(f"{out}: already exists; choose a new folder or pass --overwrite "
                        f"to replace it")
    if (source / "config.json").is_file():
        ckpt = load_hf_folder(source)
        cfg, state, vocab, lowercase = ckpt.config, ckpt.state_dict, ckpt.vocab_path, ckpt.lowercase
        architecture = architecture or ckpt.architecture
        what = f"Hugging Face {ckpt.architecture}"
    else:
        # Imported here: the checkpoint module pulls in DeepSpeed, which an HF-to-HF export
        # does not need.
        from bertscale.training.checkpoint.consolidated import load_consolidated

        model = load_consolidated(source)
        cfg, state, vocab, lowercase = (model.config, model.state_dict, model.vocab_path,
                                        model.lowercase)
        architecture = architecture or "BertForPreTraining"
        what = f"bertscale checkpoint (step {model.step})"
    written = export_hf(state, cfg, vocab, lowercase, out, architecture=architecture,
                        overwrite=overwrite, source=str(source))
    return Exported(Path(written), architecture, what, cfg, lowercase)
