"""Hugging Face BERT checkpoints in and out, without importing `transformers`.

Our module names are Hugging Face's, so a state dict converts by a key map: the encoder gains or
loses the "bert." prefix, old `LayerNorm.gamma/beta` names become `weight/bias`, the tied decoder
(weight = word embeddings, bias = cls.predictions.bias) is dropped on export and re-tied on
import, exactly as `transformers.save_pretrained` does.

Reads: a folder with config.json (model_type "bert", a Bert* architecture), model.safetensors
(or a sharded model.safetensors.index.json, or pytorch_model.bin), vocab.txt and optionally
tokenizer_config.json (for do_lower_case). Writes: config.json, model.safetensors, vocab.txt,
tokenizer_config.json, special_tokens_map.json, atomically (a temporary sibling folder renamed
into place).

Limits: absolute position embeddings only; BERT decoders (is_decoder / cross-attention) and
other model types (RoBERTa, ALBERT, ...) are refused, not guessed at. An MLM decoder whose
weight is not the word embeddings (untied) cannot be represented and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bertscale.config import HEADS, ModelConfig, from_dict
from bertscale.errors import ConfigError, UserError
from bertscale.files import write_dir_atomic
from bertscale.tokenizer import SPECIAL_TOKENS, guess_lowercase, read_vocab

# Architectures that Hugging Face builds with add_pooling_layer=False.
_NO_POOLER = {"BertForMaskedLM", "BertForTokenClassification", "BertForQuestionAnswering"}
_FINETUNE_PREFIXES = ("classifier.", "qa_outputs.")
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_REQUIRED_HF = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")


@dataclass
class HFCheckpoint:
    config: ModelConfig
    state_dict: dict[str, Tensor]
    """Our keys (BertForPreTraining style: "bert.…", "cls.…", plus any fine-tuning head)."""
    vocab_path: Path
    lowercase: bool
    architecture: str
    """architectures[0] of config.json ("BertModel" when it names none)."""


# ------------------------------------------------------------------------------------ config


def config_from_hf(hf_config: dict, source: str) -> ModelConfig:
    """A Hugging Face BertConfig dict -> ModelConfig; every error names `source`."""
    if not isinstance(hf_config, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "bert")
    if model_type != "bert":
        raise UserError(f"{source}: model_type {model_type!r} is not BERT; only model_type "
                        f"'bert' checkpoints can be read")
    for arch in hf_config.get("architectures") or []:
        if arch not in HEADS:
            raise UserError(f"{source}: unknown architecture {arch!r}; supported: "
                            f"{', '.join(HEADS)}")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise UserError(f"{source}: a BERT decoder (is_decoder / add_cross_attention) is not "
                        f"supported; bertscale reads bidirectional encoders")
    pos = hf_config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise UserError(f"{source}: position_embedding_type {pos!r} is not supported "
                        f"(only 'absolute', as in the paper)")
    missing = [k for k in _REQUIRED_HF if k not in hf_config]
    if missing:
        raise UserError(f"{source}: config lacks {', '.join(missing)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data = {k: v for k, v in hf_config.items() if k in fields and v is not None}
    try:
        cfg = from_dict(ModelConfig, data, "config")
        cfg.validate()
    except ConfigError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json dict that `transformers.BertConfig` reads as is."""
    out = dataclasses.asdict(cfg)
    out.update(model_type="bert", position_embedding_type="absolute", is_decoder=False,
               add_cross_attention=False, tie_word_embeddings=True, use_cache=False)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------- state dicts


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every BertForPreTraining weight for `cfg` (built on the meta device: no memory)."""
    from bertscale.model import BertForPreTraining

    with torch.device("meta"):
        model = BertForPreTraining(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def import_state_dict(sd: Mapping[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Hugging Face keys (BertModel without prefix, or any Bert* head model with "bert.") ->
    our keys, shape-checked against `cfg`. Shape mismatches and foreign keys name the key and
    `source`; a checkpoint without the full encoder is refused."""
    shapes = expected_shapes(cfg)
    out: dict[str, Tensor] = {}
    decoder: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                           "LayerNorm.bias")
        if new.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue  # buffers some transformers versions persisted; not weights
        if new.startswith(("embeddings.", "encoder.", "pooler.")):
            new = "bert." + new
        if new in _TIED:
            decoder[new] = value
            continue
        if new.startswith(("bert.", "cls.")):
            if new not in shapes:
                raise UserError(f"{source}: unexpected weight {key}; not a BERT checkpoint "
                                f"bertscale can read")
            if tuple(value.shape) != shapes[new]:
                raise UserError(f"{source}: weight {key} has shape {tuple(value.shape)} but the "
                                f"config needs {shapes[new]}")
        elif not new.startswith(_FINETUNE_PREFIXES):
            raise UserError(f"{source}: unexpected weight {key}; not a BERT checkpoint "
                            f"bertscale can read")
        out[new] = value
    missing = [k for k in shapes if k.startswith("bert.") and "pooler." not in k and k not in out]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise UserError(f"{source}: checkpoint lacks {len(missing)} encoder weights ({shown})")
    words = out["bert.embeddings.word_embeddings.weight"]
    if "cls.predictions.decoder.weight" in decoder and not torch.equal(
            decoder["cls.predictions.decoder.weight"], words):
        raise UserError(f"{source}: cls.predictions.decoder.weight differs from the word "
                        f"embeddings; untied MLM decoders are not supported")
    if "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in decoder:
        out["cls.predictions.bias"] = decoder["cls.predictions.decoder.bias"]
    if any(k.startswith("cls.predictions.") for k in out):
        out["cls.predictions.decoder.weight"] = words  # the tie, as our state_dict has it
    return out


def pad_vocab_rows(sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`sd` with its vocabulary rows (embeddings, MLM bias and decoder) extended to the model's,
    the rows past the checkpoint's taken from the model as initialised: the inverse of the
    export's trimming of fast.pad_vocab_multiple's padding rows, which no token reaches."""
    out = dict(sd)
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
                "cls.predictions.decoder.weight"):
        if key in out and key in model_sd and out[key].shape[0] < model_sd[key].shape[0]:
            extra = model_sd[key][out[key].shape[0]:].detach().to(out[key].dtype)
            out[key] = torch.cat([out[key], extra])
    return out


def _read_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    pt = folder / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif pt.is_file():
        try:
            loaded = torch.load(pt, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{pt}: cannot read the PyTorch weights ({e})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{pt}: expected a state dict, got {type(loaded).__name__}")
        return loaded, pt
    else:
        raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                        f"pytorch_model.bin")
    sd: dict[str, Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: cannot read the safetensors weights ({e})") from None
    return sd, files[0] if len(files) == 1 else index


def tokenizer_of_folder(folder: Path) -> tuple[Path, bool]:
    """(vocab.txt, lowercase) of a Hugging Face BERT folder: the casing from
    tokenizer_config.json's do_lower_case, else guessed from the vocabulary."""
    vocab_path = folder / "vocab.txt"
    read_vocab(vocab_path)  # UserError naming the file when missing or malformed
    lowercase: bool | None = None
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            value = json.loads(tok_config.read_text(encoding="utf-8")).get("do_lower_case")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{tok_config}: not a valid tokenizer config ({e})") from None
        if value is not None:
            if not isinstance(value, bool):
                raise UserError(f"{tok_config}: do_lower_case must be true or false, got {value!r}")
            lowercase = value
    if lowercase is None:
        lowercase = guess_lowercase(vocab_path)
    return vocab_path, lowercase


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face checkpoint folder (it has config.json), as opposed to a bertscale run."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(model config, architecture) of a Hugging Face BERT folder, without reading weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected a Hugging Face BERT checkpoint folder)")
    config_path = folder / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{config_path}: not found; a Hugging Face folder needs "
                        f"config.json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf_config, str(config_path))
    return cfg, (hf_config.get("architectures") or ["BertModel"])[0]


def load_hf_folder(path: str | Path) -> HFCheckpoint:
    """Read a Hugging Face BERT folder; every error names the offending file."""
    folder = Path(path)
    cfg, architecture = read_hf_config(folder)
    config_path = folder / "config.json"
    raw, weights_path = _read_weights(folder)
    state_dict = import_state_dict(raw, cfg, str(weights_path))

    vocab_path, lowercase = tokenizer_of_folder(folder)
    n_vocab = len(read_vocab(vocab_path))
    if n_vocab > cfg.vocab_size:
        raise UserError(f"{vocab_path}: {n_vocab} tokens but {config_path} has vocab_size "
                        f"{cfg.vocab_size}")
    return HFCheckpoint(cfg, state_dict, vocab_path, lowercase, architecture)


# ------------------------------------------------------------------------------------ export


def to_hf_keys(sd: Mapping[str, Tensor], cfg: ModelConfig, architecture: str,
                source: str) -> dict[str, Tensor]:
    if not any(k.startswith("bert.") for k in sd):  # a bare BertModel state dict
        sd = {("bert." + k if k.startswith(("embeddings.", "encoder.", "pooler.")) else k): v
              for k, v in sd.items()}
    shapes = expected_shapes(cfg)
    heads = HEADS[architecture]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _TIED:
            continue
        if key in shapes and tuple(value.shape) != shapes[key]:
            raise UserError(f"{source}: weight {key} has shape {tuple(value.shape)} but the "
                            f"config needs {shapes[key]}")
        if key.startswith(("bert.", "cls.")) and key not in shapes:
            raise UserError(f"{source}: unexpected weight {key} for a BERT of this config")
        if key.startswith("bert."):
            if "pooler." in key and architecture in _NO_POOLER:
                continue
            out[key[len("bert."):] if architecture == "BertModel" else key] = value
        elif key.startswith(heads):
            out[key] = value
    for prefix in heads:
        if not any(k.startswith(prefix) for k in out):
            raise UserError(f"{source}: no {prefix.rstrip('.')} weights, so it cannot be "
                            f"exported as {architecture}; choose an architecture it has "
                            f"weights for (BertModel always works)")
    missing = [k for k in shapes if k.startswith("bert.") and "pooler." not in k
               and (k[len("bert."):] if architecture == "BertModel" else k) not in out]
    if missing:
        raise UserError(f"{source}: model state lacks encoder weights ({', '.join(missing[:4])})")
    # Own, contiguous storage per tensor: safetensors refuses shared or strided memory.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _file_mode() -> int:
    """0666 less the process umask: what an ordinary open() would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Weights with one row per vocabulary entry, under their Hugging Face names.
_VOCAB_ROWS = frozenset({"bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight",
                         "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                         "cls.predictions.bias"})


def export_hf(model_state_dict: Mapping[str, Tensor], cfg: ModelConfig, vocab_path: str | Path,
              lowercase: bool, out_dir: str | Path, architecture: str = "BertForPreTraining",
              overwrite: bool = False, source: str = "model state") -> Path:
    """Write a folder `transformers.<architecture>.from_pretrained` loads with no missing or
    unexpected keys. Atomic: built in a temporary sibling folder, then renamed into place; an
    existing `out_dir` is replaced only with `overwrite=True`."""
    from safetensors.torch import save_file

    if architecture not in HEADS:
        raise UserError(f"unknown architecture {architecture!r}; choose one of {', '.join(HEADS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists; choose a new folder or pass --overwrite "
                        f"(overwrite=True) to replace it")
    vocab_path = Path(vocab_path)
    vocab = read_vocab(vocab_path)
    if len(vocab) > cfg.vocab_size:
        raise UserError(f"{vocab_path}: {len(vocab)} tokens exceed model vocab_size "
                        f"{cfg.vocab_size}")
    tensors = to_hf_keys(model_state_dict, cfg, architecture, source)
    if cfg.vocab_size > len(vocab):
        # Rows past the vocabulary (fast.pad_vocab_multiple, or a larger model.vocab_size) are
        # reached by no token: the export is the model the vocabulary defines.
        tensors = {k: v[:len(vocab)] if k in _VOCAB_ROWS else v for k, v in tensors.items()}
        cfg = dataclasses.replace(cfg, vocab_size=len(vocab))

    hf_config = config_to_hf(cfg)
    hf_config["architectures"] = [architecture]
    hf_config["pad_token_id"] = vocab.get("[PAD]", cfg.pad_token_id)
    if "classifier.weight" in tensors and architecture != "BertForMultipleChoice":
        n = tensors["classifier.weight"].shape[0]
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "strip_accents": None,
        "tokenize_chinese_chars": True, "model_max_length": cfg.max_position_embeddings,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    special = {name: tok for name, tok in zip(("pad_token", "unk_token", "cls_token", "sep_token",
                                                "mask_token"), SPECIAL_TOKENS)}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(_file_mode())  # safetensors writes it 0600
        shutil.copyfile(vocab_path, tmp / "vocab.txt")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n",
                                                   encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n",
                                                     encoding="utf-8")

    # Overwriting moves the old folder aside only once the new one is whole.
    write_dir_atomic(out_dir, fill, replace=True)
    return out_dir
