"""The models and tokenizers of fine-tuning: a task head on a pretrained encoder, a fine-tuned
model saved as a Hugging Face folder with its task, and the checks that the checkpoint's
vocabulary and casing suit the task's text.

Checkpoints (bertscale.pretrained, the loader `bertscale.from_pretrained` is): a Hugging Face
BERT folder (config.json + weights + vocab.txt) or a bertscale pretraining run / checkpoint
directory (any ZeRO stage, consolidated on load, no converter to run by hand). The vocabulary
and casing always come with the checkpoint.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from bertscale.errors import UserError
from bertscale.finetune.runtime import Runtime
from bertscale.parallelize import FastPaths
from bertscale.pretrained import TASK_FILE, Pretrained, build, load_checkpoint

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["Pretrained", "load_checkpoint", "build_model", "save_model", "load_task_info",
           "finetuned_task", "load_task_tokenizer", "check_length", "check_casing",
           "unk_fraction", "apply_fast_paths", "pad_id_of"]


def build_model(head: type[nn.Module] | None, pretrained: Pretrained, rt: Runtime,
                **kwargs: Any) -> nn.Module:
    """`head` on the pretrained encoder (bertscale.pretrained.build, as `from_pretrained`);
    a head the checkpoint lacks starts from init, a fine-tuned head of the same shape is kept.
    None: the head the checkpoint was fine-tuned with."""
    model, fresh = build(pretrained, head, **kwargs)
    missing_pooler = [k for k in fresh if ".pooler." in k]
    if missing_pooler:
        rt.log(f"note: {pretrained.source} has no pooler weights; the [CLS] pooler starts from "
            f"a random initialisation and is trained with the head")
    return model


def save_model(model: nn.Module, pretrained: Pretrained, folder: Path, architecture: str,
               rt: Runtime, task: Mapping[str, Any] | None = None) -> Path:
    """The fine-tuned model, head included, as a Hugging Face folder (`folder`/model), written
    by rank 0 (the replicas are identical), with `task` (what the head was trained for: task,
    labels, recipe, lengths) as bertscale_task.json, which `--eval-only`, `finetune predict`
    and `bertscale.from_pretrained` read back."""
    from bertscale.hf import export_hf
    if not rt.is_main:
        return folder / "model"
    out = export_hf(model.state_dict(), pretrained.config, pretrained.vocab_path,
                    pretrained.lowercase, folder / "model", architecture=architecture,
                    overwrite=True, source=f"fine-tuned from {pretrained.source}")
    if task is not None:
        rt.write_json(out / TASK_FILE, {**task, "fine_tuned_from": pretrained.source})
    return out


def load_task_info(folder: Path) -> dict[str, Any] | None:
    """bertscale_task.json of a fine-tuned model folder, without loading its weights."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return info
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def finetuned_task(pretrained: Pretrained, family: str) -> dict[str, Any]:
    """The saved task of a `--save-model` folder, for --eval-only / predict; a clear error for
    any other checkpoint or another task family."""
    if pretrained.task is None:
        raise UserError(f"{pretrained.source}: no {TASK_FILE}, so not a fine-tuned model; "
                        f"--eval-only and predict need a folder written by `finetune ... "
                        f"--save-model` (OUTPUT_DIR/<task>/runs/<run>/model)")
    if pretrained.task.get("family") != family:
        raise UserError(f"{pretrained.source}: fine-tuned for {pretrained.task.get('task')} "
                        f"({pretrained.task.get('family')}), not a {family} task")
    return pretrained.task


def load_task_tokenizer(pretrained: Pretrained, max_length: int | None = None) -> Tokenizer:
    """The checkpoint's WordPiece tokenizer, with its own casing; optional truncation."""
    from bertscale.tokenizer import load_tokenizer
    check_length(pretrained, max_length)
    tok = load_tokenizer(pretrained.vocab_path, pretrained.lowercase)
    if max_length is not None:
        tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


def pad_id_of(tok: Tokenizer) -> int:
    """The vocabulary's [PAD] id (0, collate's default, for a vocabulary without one)."""
    found = tok.token_to_id("[PAD]")
    return 0 if found is None else int(found)


def check_length(pretrained: Pretrained, max_seq_length: int | None) -> None:
    if max_seq_length is not None and max_seq_length > pretrained.config.max_position_embeddings:
        raise UserError(f"data.max_seq_length {max_seq_length} exceeds the "
                        f"{pretrained.config.max_position_embeddings} positions of "
                        f"{pretrained.source}")


def check_casing(pretrained: Pretrained, unk_rate: float, what: str,
                 texts: Iterable[str] = ()) -> None:
    """Warn when the checkpoint's casing does not suit the data.

    Three signals: the casing flag disagrees with the vocabulary itself (an uncased vocab read
    case-sensitively turns capitalised words into [UNK]; a cased vocab lower-cased wastes it);
    the share of [UNK] word pieces in the task's text is high (above 2%: BERT's own vocab
    gives well under 1% on English GLUE / SQuAD text); and the casing of the text itself
    (`texts`, a sample of it): cased text (over 5% of the words after a sentence's first are
    capitalised: names, places) given an uncased checkpoint loses its case before
    tokenization, and all-lower-case text given a cased checkpoint never uses its capitals."""
    from bertscale.tokenizer import guess_lowercase
    vocab_uncased = guess_lowercase(pretrained.vocab_path)
    if vocab_uncased != pretrained.lowercase:
        warnings.warn(
            f"{pretrained.source}: the checkpoint says lowercase={pretrained.lowercase} but its "
            f"vocabulary looks {'uncased' if vocab_uncased else 'cased'}; {what} will be "
            f"tokenized {'lower-cased' if pretrained.lowercase else 'as written'}", stacklevel=2)
    if unk_rate > 0.02:
        warnings.warn(
            f"{what}: {100 * unk_rate:.1f}% of word pieces are [UNK] with the vocabulary of "
            f"{pretrained.source} (lowercase={pretrained.lowercase}); the checkpoint's casing "
            f"or vocabulary may not match this data", stacklevel=2)
    capitalised, letters_upper, words = _text_casing(texts)
    if not words:
        return
    if pretrained.lowercase and capitalised > 0.05:
        warnings.warn(
            f"{what} is cased ({100 * capitalised:.0f}% of words after the first of a line are "
            f"capitalised) but {pretrained.source} is uncased: the text is lower-cased before "
            f"tokenization and its case is lost (fine for most GLUE tasks; named entities and "
            f"other case-sensitive tasks do better with a cased checkpoint)", stacklevel=2)
    if not pretrained.lowercase and letters_upper == 0:
        warnings.warn(
            f"{what} is all lower-case but {pretrained.source} is cased: its capitalised "
            f"vocabulary goes unused and the text reads unlike its pretraining data; an "
            f"uncased checkpoint suits this data better", stacklevel=2)


def _text_casing(texts: Iterable[str]) -> tuple[float, int, int]:
    """(share of non-initial words starting with a capital, upper-case letters, words)."""
    capital = later = upper = words = 0
    for text in texts:
        ws = text.split()
        words += len(ws)
        upper += sum(c.isupper() for c in text)
        for w in ws[1:]:
            if w[:1].isalpha():
                later += 1
                capital += w[0].isupper()
    return capital / max(later, 1), upper, words


def unk_fraction(tok: Tokenizer, encodings: Iterable[Sequence[int]]) -> float:
    unk = tok.token_to_id("[UNK]")
    total = hits = 0
    for ids in encodings:
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / max(total, 1)


def apply_fast_paths(model: nn.Module, fast: FastPaths) -> None:
    """Switch the encoder's fast paths; a model without a BERT encoder (the feature-mode
    tagger) has nothing to switch."""
    from bertscale import parallelize
    from bertscale.model import BertModel
    if any(isinstance(m, BertModel) for m in model.modules()):
        parallelize.apply_fast_paths(model, fast)
