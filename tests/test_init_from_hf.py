"""Continued pretraining from a Hugging Face BERT folder (`train.init_from`), through
`bertscale pretrain` on real Wikipedia shards:

- our own run exported by `bertscale export` (BertForPreTraining, heads included) and read back
  trains exactly as the same weights taken from the run folder (`init_from` the bertscale way):
  the same loss at every step on the same batches (both runs start at the same data position
  with the same seed, so their first batch and its masks are the same), and the same held-out
  eval at the start as the source run's own eval at the exported step (same weights, same eval
  samples and masks). A fresh MLM or NSP head would change both;
- the real MiniLM weights (an encoder only): the encoder is loaded (after one step at a learning
  rate of 1e-12 the checkpoint holds MiniLM's weights), the pooler too, and the MLM and NSP heads
  are named as fresh;
- a recipe of another shape, or shards of another tokenizer, stop at start with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_runs import manifest, pretrain, records, train_losses  # noqa: F401

RUN = ("train.global_batch_size=16", "train.micro_batch_size=8", "schedule.warmup=0",
       "eval.every=0", "eval.at_start=true", "eval.samples=64", "checkpoint.every=100")
MINILM_SHAPE = ("model.hidden_size=384", "model.num_hidden_layers=6",
                "model.num_attention_heads=12", "model.intermediate_size=1536")


def _export(run: Path, out: Path, architecture: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "bertscale", "export", "--from", str(run),
                        "--to", str(out), "--architecture", architecture],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _eval(run: Path, step: int) -> dict:
    got = [r for r in records(run, "eval") if r["step"] == step]
    assert len(got) == 1
    return {k: v for k, v in got[0].items() if k not in ("time", "seconds", "samples_per_s")}


def _init_line(results) -> str:
    return next(ln for ln in results[0].stdout.splitlines() if ln.startswith("initialised from"))


@pytest.mark.slow
def test_our_export_continues_exactly_as_the_run_folder(manifest, tmp_path: Path) -> None:
    source = tmp_path / "source"
    pretrain(source, manifest, 1, "train.global_batch_size=16", "train.micro_batch_size=8",
             "train.steps=3", "schedule.warmup=1", "checkpoint.every=3", "eval.every=3",
             "eval.at_start=false",
             "eval.samples=64")
    hf = _export(source, tmp_path / "hf", "BertForPreTraining")
    runs = {}
    for name, init in (("native", source), ("hf", hf)):
        runs[name] = tmp_path / name
        out = pretrain(runs[name], manifest, 1, *RUN, "train.steps=2",
                       f"train.init_from={json.dumps(str(init))}")
        if name == "hf":
            assert _init_line(out) == (f"initialised from the Hugging Face BertForPreTraining "
                                       f"folder {hf}: encoder, pooler, MLM head, NSP head loaded")
    losses = train_losses(runs["native"])
    assert len(losses) == 2 and train_losses(runs["hf"]) == losses   # fp32: exactly
    # The weights the source run evaluated at its step 3 are the ones both runs start from.
    assert _eval(runs["hf"], 0) == _eval(runs["native"], 0)
    assert {k: v for k, v in _eval(runs["hf"], 0).items() if k != "step"} == {
        k: v for k, v in _eval(source, 3).items() if k != "step"}



@pytest.mark.slow
def test_minilm_encoder_continues_with_fresh_heads(manifest, minilm_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from bertscale.training.checkpoint.consolidated import load_consolidated

    run = tmp_path / "minilm"
    out = pretrain(run, manifest, 1, *RUN, *MINILM_SHAPE, "train.steps=1", "optimizer.lr=1e-12",
                   "optimizer.weight_decay=0.0", "eval.at_start=false", "checkpoint.every=1",
                   f"train.init_from={json.dumps(str(minilm_dir))}")
    assert _init_line(out) == (f"initialised from the Hugging Face BertModel folder {minilm_dir}: "
                               f"encoder, pooler loaded; MLM head, NSP head initialised fresh "
                               f"(not in the folder)")
    assert 0 < train_losses(run)[1] < 20
    saved = load_consolidated(run).state_dict
    theirs = load_file(str(minilm_dir / "model.safetensors"))
    assert len(theirs) > 90
    for key, value in theirs.items():
        if key.endswith("position_ids"):
            continue
        ours = saved["bert." + key]
        assert torch.allclose(ours, value, atol=1e-9, rtol=0), key   # one step at lr 1e-12
    assert any(k.startswith("cls.seq_relationship.") for k in saved)


def test_shape_and_tokenizer_mismatches_are_one_line(manifest, minilm_dir: Path, tmp_path: Path,
                                                     shared_data: Path, capfd) -> None:
    from bertscale.commands.prepare import main as prepare
    from bertscale.commands.pretrain import main as pretrain_main

    def refused(*sets: str, shards: Path = manifest) -> str:
        argv = ["tiny_ci", "--run-dir", str(tmp_path / "run"),
                "--set", f"data.manifest={json.dumps(str(shards))}",
                "--set", f"train.init_from={json.dumps(str(minilm_dir))}", "--set", "eval.samples=16"]
        for s in sets:
            argv += ["--set", s]
        capfd.readouterr()
        assert pretrain_main(argv) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = refused()   # the tiny recipe: L=2, H=128
    assert err == (f"bertscale pretrain: error: train.init_from {minilm_dir}: the recipe's model "
                   f"differs from its config.json (hidden_size 128 vs 384; num_hidden_layers 2 "
                   f"vs 6; num_attention_heads 2 vs 12; intermediate_size 512 vs 1536); give the "
                   f"recipe the checkpoint's shape: --set model.hidden_size=384 --set "
                   f"model.num_hidden_layers=6 --set model.num_attention_heads=12 --set "
                   f"model.intermediate_size=1536")
    # Shards tokenized case-sensitively: not MiniLM's (uncased) tokenizer.
    cased = tmp_path / "cased"
    assert prepare([str(shared_data / "wikipedia" / "wiki_00.gz"), "--vocab", str(minilm_dir),
                    "--cased", "--out", str(cased), "--samples-per-shard", "1000",
                    "--eval-fraction", "0.05", "--progress", "none"]) == 0
    err = refused(*MINILM_SHAPE, shards=cased / "seq128" / "manifest.json")
    assert err == (f"bertscale pretrain: error: train.init_from {minilm_dir}: the shards were "
                   f"prepared with another tokenizer than the checkpoint's "
                   f"({minilm_dir / 'vocab.txt'}, uncased); prepare them with `bertscale prepare "
                   f"--vocab {minilm_dir} …`")


def test_masked_lm_folder_and_padded_vocabulary(minilm_dir: Path, tmp_path: Path) -> None:
    """Library level (the runs above show the command's side): a BertForMaskedLM folder loads
    its MLM head weight for weight and leaves the pooler and NSP head fresh; into a model whose
    vocabulary is padded (fast.pad_vocab_multiple) the folder's rows go first and the padding
    rows keep their fresh values."""
    from bertscale.config import ModelConfig
    from bertscale.hf import export_hf
    from bertscale.model import BertForPreTraining
    from bertscale.pretraining.plan import InitFrom

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64)
    source = BertForPreTraining(cfg)
    folder = export_hf(source.state_dict(), cfg, minilm_dir / "vocab.txt", True, tmp_path / "mlm",
                       architecture="BertForMaskedLM")
    padded = ModelConfig(**{**cfg.__dict__, "vocab_size": 30528})
    torch.manual_seed(1)
    model = BertForPreTraining(padded)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    init = InitFrom(folder, "huggingface", architecture="BertForMaskedLM")
    init.load_into(model)
    assert init.fresh == ["pooler", "NSP head"]
    assert init.describe().endswith("encoder, MLM head loaded; pooler, NSP head initialised "
                                    "fresh (not in the folder)")
    got, want = model.state_dict(), source.state_dict()
    for key, value in got.items():
        if key.startswith(("bert.pooler.", "cls.seq_relationship.")):
            assert torch.equal(value, fresh[key]), key
        elif key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
                     "cls.predictions.decoder.weight"):
            assert torch.equal(value[:30522], want[key]), key
            assert torch.equal(value[30522:], fresh[key][30522:]), key
        else:
            assert torch.equal(value, want[key]), key
