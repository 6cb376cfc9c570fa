"""One call from a checkpoint folder to a ready model: `bertscale.from_pretrained`.

    import bertscale
    model = bertscale.from_pretrained("hf/bert-base-uncased", head="sequence-classification",
                                      num_labels=2)          # a fresh head on the encoder
    model = bertscale.from_pretrained("finetuned/MRPC/runs/lr2e-05-seed1/model")   # with its head
    tok = bertscale.tokenizer_for("finetuned/MRPC/runs/lr2e-05-seed1/model")

A folder is a Hugging Face BERT folder (config.json + weights + vocab.txt; bertscale's own
`export` and `finetune --save-model` write these) or a bertscale pretraining run / checkpoint
folder (any ZeRO stage, consolidated in memory). The vocabulary and casing always come with
the checkpoint. A folder written by `finetune --save-model` also holds bertscale_task.json
(task, labels, the recipe, the sequence lengths): `head=None` then rebuilds that head with its
trained weights, which is how `finetune … --eval-only` and `finetune predict` load it. The
fine-tuning commands build every model through `build` below.

Limits: the model is returned on the CPU in eval mode; heads are bertscale.model's classes
(HF-compatible names), not `transformers` classes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bertscale.config import ModelConfig
from bertscale.errors import UserError

TASK_FILE = "bertscale_task.json"
"""Written beside a fine-tuned model: what the head was trained for."""

HEAD_ALIASES = {
    "encoder": "BertModel", "pretraining": "BertForPreTraining", "masked-lm": "BertForMaskedLM",
    "sequence-classification": "BertForSequenceClassification",
    "question-answering": "BertForQuestionAnswering", "multiple-choice": "BertForMultipleChoice",
    "token-classification": "BertForTokenClassification",
}
_NEEDS_LABELS = ("BertForSequenceClassification", "BertForTokenClassification")


@dataclass
class Pretrained:
    """A checkpoint read into memory, ready to build a model from."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    """BertForPreTraining keys (bert.*, cls.*) plus any fine-tuned head (classifier.*,
    qa_outputs.*); parts that are absent are fine."""
    vocab_path: Path
    lowercase: bool
    source: str
    """The path as the user gave it, for messages and the results file."""
    kind: str
    """"huggingface" or "bertscale"."""
    architecture: str = "BertForPreTraining"
    """The head the folder was saved with (config.json's architectures[0])."""
    task: dict[str, Any] | None = None
    """bertscale_task.json of a `finetune --save-model` folder, else None."""
    resolved: str = ""
    """The folder the weights were read from: for a bertscale run folder, the committed
    checkpoint it resolved to (its newest, at the moment of loading)."""
    step: int | None = None
    """The pretraining step of a bertscale checkpoint; None for a Hugging Face folder."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights as loaded (names, dtypes, shapes, bytes): what was fine-tuned,
        whatever the folder layout, ZeRO stage or path it came from."""
        h = hashlib.sha256()
        for name in sorted(self.state_dict):
            t = self.state_dict[name].detach().cpu().contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        return h.hexdigest()

    def identity(self) -> dict[str, Any]:
        """What a fine-tuning result records about its pretrained weights, and what a grid
        compares so that it never averages runs of two checkpoints."""
        return {"checkpoint": self.resolved or self.source, "checkpoint_kind": self.kind,
                "checkpoint_step": self.step, "checkpoint_fingerprint": self.fingerprint}


def load_checkpoint(path: str | Path) -> Pretrained:
    """A Hugging Face folder (it has config.json) or a bertscale run / checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise not_found(path)
    if p.is_dir() and (p / "config.json").is_file():
        from bertscale.hf import load_hf_folder
        ck = load_hf_folder(p)
        config, weights, vocab, lowercase = ck.config, ck.state_dict, ck.vocab_path, ck.lowercase
        kind, architecture = "huggingface", ck.architecture
        resolved, step = str(p), None
    else:
        try:
            from bertscale.training.checkpoint.consolidated import load_consolidated
            from bertscale.training.checkpoint.layout import resolve
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("bertscale.training"):
                raise
            raise UserError(f"{p}: no config.json, so not a Hugging Face folder, and this "
                            f"installation cannot read bertscale checkpoints") from None
        # Resolved once: a run folder's newest checkpoint can change while this loads.
        committed = resolve(p)
        model = load_consolidated(committed.path)
        config, weights, vocab, lowercase = (model.config, model.state_dict, model.vocab_path,
                                             model.lowercase)
        kind, architecture = "bertscale", "BertForPreTraining"
        resolved, step = str(committed.path), committed.step
    task = None
    if p.is_dir() and (p / TASK_FILE).is_file():
        try:
            task = json.loads((p / TASK_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{p / TASK_FILE}: not valid JSON ({e})") from None
    return Pretrained(config=config, state_dict=dict(weights),
                      vocab_path=Path(vocab), lowercase=bool(lowercase),
                      source=str(p), kind=kind, architecture=architecture, task=task,
                      resolved=resolved, step=step)


def not_found(path: str | Path) -> UserError:
    """The error for a checkpoint that is not there. A name like `bert-base-uncased` or
    `google-bert/bert-base-uncased` is a Hub model id: say that nothing is downloaded and what
    to pass instead."""
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text):
        name = text.rsplit("/", 1)[-1]
        return UserError(f"{text}: checkpoint not found; bertscale does not download models "
                         f"from the Hugging Face Hub: pass a local folder, a Hugging Face BERT "
                         f"folder (config.json, weights, vocab.txt; e.g. `hf download {text} "
                         f"--local-dir hf/{name}`) or a bertscale run or checkpoint folder")
    return UserError(f"{text}: checkpoint not found (expected a Hugging Face BERT folder or a "
                     f"bertscale run or checkpoint folder)")


def head_class(head: str | type) -> type:
    """A bertscale.model head class from a class, its name, or an alias ("sequence-classification")."""
    from bertscale import model as M
    if isinstance(head, type):
        return head
    name = HEAD_ALIASES.get(head, head)
    cls = getattr(M, name, None) if name.startswith("Bert") else None
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise UserError(f"unknown head {head!r}; choose one of {', '.join(HEAD_ALIASES)} "
                        f"(or a class name: {', '.join(HEAD_ALIASES.values())})")
    return cls


def build(pretrained: Pretrained, head: str | type | None = None, **kwargs: Any) -> tuple[nn.Module, list[str]]:
    """The model `head` (default: the checkpoint's own) with the checkpoint's weights; returns
    (model, keys that kept their fresh initialisation). A classification head's num_labels
    defaults to the checkpoint's trained head, when it has one."""
    from bertscale.model import load_pretrained
    cls = head_class(head or pretrained.architecture)
    if cls.__name__ in _NEEDS_LABELS and "num_labels" not in kwargs:
        trained = pretrained.state_dict.get("classifier.weight")
        if trained is None:
            raise UserError(f"{pretrained.source}: head {cls.__name__} needs num_labels (the "
                            f"checkpoint has no trained classifier to take it from)")
        kwargs["num_labels"] = int(trained.shape[0])
    model = cls(pretrained.config, **kwargs)
    with warnings.catch_warnings():
        # An encoder-only checkpoint has no pooler for the classification heads: callers say
        # that once (the returned keys), not as a library warning per model.
        warnings.simplefilter("ignore")
        fresh = load_pretrained(model, pretrained.state_dict, pretrained.source)
    return model, fresh


def from_pretrained(path: str | Path, head: str | type | None = None, **kwargs: Any) -> nn.Module:
    """A ready model (CPU, eval mode) from a Hugging Face folder, a bertscale run or checkpoint
    folder, or a `finetune --save-model` folder. `head`: a bertscale.model class, its name, or
    one of HEAD_ALIASES; None = the head the folder was saved with (its trained weights
    included). Extra keyword arguments go to the head (e.g. num_labels)."""
    model, _ = build(load_checkpoint(path), head, **kwargs)
    return model.eval()


def tokenizer_for(path: str | Path, max_length: int | None = None) -> Any:
    """The checkpoint's WordPiece tokenizer (tokenizers.Tokenizer) with its own casing;
    optional longest-first truncation to `max_length` tokens."""
    from bertscale.tokenizer import load_tokenizer
    p = load_checkpoint(path)
    tok = load_tokenizer(p.vocab_path, p.lowercase)
    if max_length is not None:
        tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok
