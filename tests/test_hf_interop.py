"""Hugging Face interop: the model is the paper's model (DESIGN guarantee 1).

The reference is `transformers` itself: random-initialised HF BERT models (every head) and the
real pretrained all-MiniLM-L6-v2 encoder. Everything runs in fp32 on the CPU, dropout off.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bertscale.commands import export as export_cmd  # noqa: E402
from bertscale.errors import ConfigError, UserError  # noqa: E402
from bertscale.hf import config_from_hf, export_hf, import_state_dict, load_hf_folder  # noqa: E402
from bertscale.model import (  # noqa: E402
    BertForMultipleChoice, BertForPreTraining, BertForQuestionAnswering,
    BertForSequenceClassification, BertForTokenClassification, BertModel, load_pretrained)
from bertscale.tokenizer import load_tokenizer  # noqa: E402

TOL = 1e-5  # max abs difference allowed between our logits and transformers' (fp32, CPU)


def hf_config(attn: str = "eager", **kw) -> "transformers.BertConfig":
    # initializer_range 0.05 (not 0.02) makes activations large enough that a wrong model
    # shows up above TOL (measured: tanh-GELU 3e-4, LayerNorm eps 1e-6 for 1e-12 3e-5) while
    # the right one stays well under it (~6e-7).
    args = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, initializer_range=0.05,
                attn_implementation=attn)
    args.update(kw)
    return transformers.BertConfig(**args)


def ours_from_hf(cls, hf_model, *args):
    cfg = config_from_hf(hf_model.config.to_dict(), "hf config")
    model = cls(cfg, *args).eval()
    load_pretrained(model, import_state_dict(hf_model.state_dict(), cfg, "hf model"), "hf model")
    return model


def batch(seed: int = 0, B: int = 4, T: int = 24, V: int = 1000, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    tt = torch.zeros_like(ids)
    tt[:, T // 2:] = 1
    am = torch.ones_like(ids)
    if pad:  # ragged lengths, one sequence unpadded
        for b, n in enumerate((T, T - 3, T // 2, 5)[:B]):
            am[b, n:] = 0
            ids[b, n:] = 0
            tt[b, n:] = 0
    return ids, tt, am


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pretraining_logits_match_transformers(attn):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(hf_config(attn)).eval()
    ours = ours_from_hf(BertForPreTraining, hf)
    for pad in (False, True):
        ids, tt, am = batch(pad=pad)
        with torch.no_grad():
            ref = hf(input_ids=ids, token_type_ids=tt, attention_mask=am)
            out = ours(ids, tt, am)
        real = am.bool()
        mlm = max_diff(out.mlm_logits[real], ref.prediction_logits[real])
        nsp = max_diff(out.nsp_logits, ref.seq_relationship_logits)
        print(f"\n[parity HF attn={attn} padding={pad}] MLM max|diff| {mlm:.2e} "
              f"(logit scale {ref.prediction_logits.abs().max():.1f}), NSP {nsp:.2e}")
        assert mlm < TOL and nsp < TOL

        # The sparse head equals the dense logits gathered at the masked positions.
        pos = torch.tensor([[1, 2, 7, 0], [3, 4, 0, 0], [1, 5, 9, 11], [2, 0, 0, 0]])
        with torch.no_grad():
            sparse = ours(ids, tt, am, masked_positions=pos).mlm_logits       # (B, P, V)
        dense = torch.gather(out.mlm_logits, 1, pos[..., None].expand(-1, -1, 1000))
        assert sparse.shape == (4, 4, 1000)
        assert max_diff(sparse, dense) < 1e-6


def test_pretraining_loss_matches_transformers():
    from bertscale.model import pretraining_loss

    torch.manual_seed(1)
    hf = transformers.BertForPreTraining(hf_config()).eval()
    ours = ours_from_hf(BertForPreTraining, hf)
    ids, tt, am = batch(seed=3)
    pos = torch.tensor([[1, 2, 7, 0], [3, 4, 0, 0], [1, 5, 9, 11], [2, 0, 0, 0]])
    labels_sparse = torch.tensor([[11, 12, 13, -100], [14, 15, -100, -100],
                                  [16, 17, 18, 19], [20, -100, -100, -100]])
    labels_dense = torch.full_like(ids, -100)                                # (B, T)
    for b in range(4):
        for p, lab in zip(pos[b], labels_sparse[b]):
            if lab != -100:
                labels_dense[b, p] = lab
    nsp = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels_dense,
                 next_sentence_label=nsp)
        dense = pretraining_loss(ours(ids, tt, am), labels_dense, nsp)
        sparse = pretraining_loss(ours(ids, tt, am, masked_positions=pos), labels_sparse, nsp)
        mlm_only = pretraining_loss(ours(ids, tt, am, masked_positions=pos), labels_sparse,
                                    torch.full_like(nsp, -100))
    print(f"\n[loss] HF {ref.loss.item():.6f} ours dense {dense.total.item():.6f} "
          f"sparse {sparse.total.item():.6f}")
    assert abs(dense.total.item() - ref.loss.item()) < TOL
    assert abs(sparse.total.item() - ref.loss.item()) < TOL
    assert int(sparse.mlm_count) == 10 and int(sparse.nsp_count) == 4
    # Accuracy counters against a direct count from the reference logits.
    hits = (ref.prediction_logits.argmax(-1) == labels_dense) & (labels_dense != -100)
    assert int(sparse.mlm_correct) == int(hits.sum())
    assert int(sparse.nsp_correct) == int((ref.seq_relationship_logits.argmax(-1) == nsp).sum())
    assert mlm_only.nsp.item() == 0.0 and int(mlm_only.nsp_count) == 0
    assert torch.allclose(mlm_only.total, sparse.mlm)


def test_finetuning_heads_match_transformers():
    ids, tt, am = batch(seed=5)
    cases = [
        (transformers.BertForSequenceClassification, BertForSequenceClassification, (3,),
         dict(num_labels=3), lambda r: r.logits),
        (transformers.BertForSequenceClassification, BertForSequenceClassification, (1,),
         dict(num_labels=1), lambda r: r.logits),
        (transformers.BertForTokenClassification, BertForTokenClassification, (5,),
         dict(num_labels=5), lambda r: r.logits),
        (transformers.BertForQuestionAnswering, BertForQuestionAnswering, (),
         {}, lambda r: torch.stack([r.start_logits, r.end_logits])),
    ]
    for i, (hf_cls, our_cls, args, kw, pick) in enumerate(cases):
        torch.manual_seed(10 + i)
        hf = hf_cls(hf_config(**kw)).eval()
        ours = ours_from_hf(our_cls, hf, *args)
        with torch.no_grad():
            ref = pick(hf(input_ids=ids, token_type_ids=tt, attention_mask=am))
            out = ours(ids, tt, am)
        out = torch.stack(out) if isinstance(out, tuple) else out
        d = max_diff(out, ref)  # every position, padding included: the kernels agree there too
        print(f"\n[parity {our_cls.__name__}{args}] max|diff| {d:.2e}")
        assert out.shape == ref.shape and d < TOL

    torch.manual_seed(20)
    hf = transformers.BertForMultipleChoice(hf_config()).eval()
    ours = ours_from_hf(BertForMultipleChoice, hf)
    mc = [t.view(2, 2, -1) for t in (ids, tt, am)]                           # (B, C, T)
    with torch.no_grad():
        ref = hf(input_ids=mc[0], token_type_ids=mc[1], attention_mask=mc[2]).logits
        out = ours(*mc)
    print(f"[parity BertForMultipleChoice] max|diff| {max_diff(out, ref):.2e}")
    assert out.shape == (2, 2) and max_diff(out, ref) < TOL


def test_export_round_trip_is_exact(tmp_path, shared_data):
    torch.manual_seed(2)
    cfg = config_from_hf(hf_config().to_dict(), "hf config")
    ours = BertForPreTraining(cfg).eval()
    vocab = tmp_path / "vocab.txt"
    # A real vocab's first 1000 tokens: the specials are at 0 and 100-103 in Google's file.
    lines = (shared_data / "vocab" / "bert-base-uncased-vocab.txt").read_text().splitlines()
    vocab.write_text("\n".join(lines[:1000]) + "\n")
    out_dir = export_hf(ours.state_dict(), cfg, vocab, True, tmp_path / "hf")

    hf, info = transformers.BertForPreTraining.from_pretrained(out_dir, output_loading_info=True,
                                                               attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids, tt, am = batch(seed=7)
    with torch.no_grad():
        ref, out = hf(input_ids=ids, token_type_ids=tt, attention_mask=am), ours(ids, tt, am)
    real = am.bool()
    d = max(max_diff(out.mlm_logits[real], ref.prediction_logits[real]),
            max_diff(out.nsp_logits, ref.seq_relationship_logits))
    print(f"\n[export -> transformers] max|diff| {d:.2e}")
    assert d < TOL

    # ours -> HF -> ours: every tensor bit-identical, by both routes back.
    back = BertForPreTraining(cfg)
    assert load_pretrained(back, import_state_dict(hf.state_dict(), cfg, "hf"), "hf") == []
    folder = load_hf_folder(out_dir)
    assert folder.architecture == "BertForPreTraining" and folder.lowercase is True
    want = ours.state_dict()
    for got in (back.state_dict(), folder.state_dict):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    tok = transformers.BertTokenizerFast.from_pretrained(out_dir)
    # transformers reads our tokenizer files: same ids, lower-casing included.
    assert tok("Hello World")["input_ids"] == load_tokenizer(vocab, True).encode("Hello World").ids


def _mrpc_pairs(shared_data: Path, n: int = 12) -> list[tuple[str, str]]:
    with open(shared_data / "glue" / "MRPC" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    return [(r[3], r[4]) for r in rows]


def _encode(tokenizer, pairs, single: int = 4):
    encs = [tokenizer.encode(a) for a, _ in pairs[:single]] + \
           [tokenizer.encode(a, b) for a, b in pairs[single:]]
    T = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), T, dtype=torch.long)
    tt, am = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n], tt[i, :n], am[i, :n] = torch.tensor(e.ids), torch.tensor(e.type_ids), 1
    return ids, tt, am


def test_real_pretrained_weights_match_transformers(minilm_dir, shared_data, tmp_path):
    ckpt = load_hf_folder(minilm_dir)
    assert ckpt.architecture == "BertModel" and ckpt.lowercase is True
    assert (ckpt.config.num_hidden_layers, ckpt.config.hidden_size) == (6, 384)
    ours = BertModel(ckpt.config).eval()
    assert load_pretrained(ours, ckpt.state_dict, str(minilm_dir)) == []
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()

    ids, tt, am = _encode(load_tokenizer(ckpt.vocab_path, ckpt.lowercase), _mrpc_pairs(shared_data))
    assert (am == 0).any()  # padded batch
    with torch.no_grad():
        ref, out = hf(input_ids=ids, token_type_ids=tt, attention_mask=am), ours(ids, tt, am)
    real = am.bool()
    d = max_diff(out.last_hidden_state[real], ref.last_hidden_state[real])
    dp = max_diff(out.pooler_output, ref.pooler_output)
    print(f"\n[all-MiniLM-L6-v2 real weights, {ids.shape[0]} MRPC texts, T={ids.shape[1]}] "
          f"last_hidden_state max|diff| {d:.2e} (scale {ref.last_hidden_state.abs().max():.1f}), "
          f"pooler {dp:.2e}")
    assert d < TOL and dp < TOL

    # An encoder-only checkpoint feeds pretraining with fresh heads and a warning naming them.
    pre = BertForPreTraining(ckpt.config)
    with pytest.warns(UserWarning, match=r"cls\.predictions.*fresh"):
        fresh = load_pretrained(pre, ckpt.state_dict, str(minilm_dir))
    assert fresh and all(k.startswith("cls.") for k in fresh)
    assert torch.equal(pre.bert.embeddings.word_embeddings.weight,
                       ckpt.state_dict["bert.embeddings.word_embeddings.weight"])
    assert pre.cls.predictions.decoder.weight is pre.bert.embeddings.word_embeddings.weight
    head = pre.cls.predictions.transform.dense.weight
    assert head.abs().max() <= 0.04 and 0.015 < head.std() < 0.02  # Google's init, not loaded
    # ... and fine-tuning heads load it silently, their classifier fresh.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = BertForSequenceClassification(ckpt.config, 2)
        assert load_pretrained(clf, ckpt.state_dict, "minilm") == ["classifier.weight",
                                                                    "classifier.bias"]
        qa = BertForQuestionAnswering(ckpt.config)
        assert load_pretrained(qa, ckpt.state_dict, "minilm") == ["qa_outputs.weight",
                                                                   "qa_outputs.bias"]
    with torch.no_grad():
        h = qa.eval().bert(ids, tt, am).last_hidden_state
    assert max_diff(h[real], ref.last_hidden_state[real]) < TOL

    # `bertscale export` of the folder: transformers loads the copy with the same outputs.
    parser = argparse.ArgumentParser()
    export_cmd.register(parser.add_subparsers())
    out_dir = tmp_path / "exported"
    args = parser.parse_args(["export", "--from", str(minilm_dir), "--to", str(out_dir)])
    assert args.func(args) == 0
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == ["BertModel"]
    hf2, info = transformers.BertModel.from_pretrained(out_dir, output_loading_info=True,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ref2 = hf2.eval()(input_ids=ids, token_type_ids=tt, attention_mask=am)
    assert torch.equal(ref2.last_hidden_state, ref.last_hidden_state)
    # Asking for heads the source lacks, or writing over an existing folder, is refused.
    args = parser.parse_args(["export", "--from", str(minilm_dir), "--to", str(tmp_path / "x"),
                              "--architecture", "BertForPreTraining"])
    with pytest.raises(UserError, match="cls.predictions"):
        args.func(args)
    assert not (tmp_path / "x").exists()
    args = parser.parse_args(["export", "--from", str(minilm_dir), "--to", str(out_dir)])
    with pytest.raises(UserError, match="already exists; choose a new folder or pass --overwrite"):
        args.func(args)


def test_export_of_hf_pretraining_folder(tmp_path):
    torch.manual_seed(3)
    hf = transformers.BertForPreTraining(hf_config()).eval()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "vocab.txt").write_text("".join(f"{t}\n" for t in
                                           ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                           + [f"tok{i}" for i in range(995)]))
    parser = argparse.ArgumentParser()
    export_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["export", "--from", str(src), "--to", str(tmp_path / "out")])
    assert args.func(args) == 0
    hf2 = transformers.BertForPreTraining.from_pretrained(tmp_path / "out",
                                                         attn_implementation="eager").eval()
    ids, tt, am = batch(seed=9)
    with torch.no_grad():
        a = hf(input_ids=ids, token_type_ids=tt, attention_mask=am)
        b = hf2(input_ids=ids, token_type_ids=tt, attention_mask=am)
    assert torch.equal(a.prediction_logits, b.prediction_logits)
    assert torch.equal(a.seq_relationship_logits, b.seq_relationship_logits)


# --------------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny_hf_folder(tmp_path, minilm_dir) -> Path:
    """A real HF folder to break in different ways: the MiniLM config/vocab, small weights."""
    torch.manual_seed(4)
    hf = transformers.BertModel(hf_config(vocab_size=30522)).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    shutil.copyfile(minilm_dir / "vocab.txt", folder / "vocab.txt")
    load_hf_folder(folder)  # sound before we break it
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["RobertaForMaskedLM"]), "unknown architecture 'RobertaForMaskedLM'"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not BERT"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_act="swish"), "hidden_act"),
    # safetensors lists keys sorted, so the first mismatch met is layer 0's bias.
    (dict(intermediate_size=96), r"weight encoder.layer.0.intermediate.dense.bias has shape "
                                 r"\(128,\) but the config needs \(96,\)"),
])
def test_bad_hf_config_names_the_file(tiny_hf_folder, changes, message):
    _edit_config(tiny_hf_folder, **changes)
    with pytest.raises(UserError, match=message) as e:
        load_hf_folder(tiny_hf_folder)
    file = "model.safetensors" if "intermediate_size" in changes else "config.json"
    assert str(tiny_hf_folder / file) in str(e.value)


def test_bad_hf_files_name_the_file(tiny_hf_folder):
    cfg_path = tiny_hf_folder / "config.json"
    good = cfg_path.read_text()
    cfg_path.write_text(good[:-20])
    with pytest.raises(UserError, match="not valid JSON") as e:
        load_hf_folder(tiny_hf_folder)
    assert str(cfg_path) in str(e.value)
    cfg_path.unlink()
    with pytest.raises(UserError, match="config.json: not found"):
        load_hf_folder(tiny_hf_folder)
    cfg_path.write_text(good)

    weights = tiny_hf_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read the safetensors weights") as e:
        load_hf_folder(tiny_hf_folder)
    assert str(weights) in str(e.value)
    weights.write_bytes(data)

    vocab = tiny_hf_folder / "vocab.txt"
    text = vocab.read_text()
    vocab.write_text(text.replace("[MASK]\n", "[MASKED]\n"))
    with pytest.raises(UserError, match=r"missing special tokens \[MASK\]") as e:
        load_hf_folder(tiny_hf_folder)
    assert str(vocab) in str(e.value)
    vocab.unlink()
    with pytest.raises(UserError, match="vocabulary file not found") as e:
        load_hf_folder(tiny_hf_folder)
    assert str(vocab) in str(e.value)


def test_shape_mismatch_on_load_names_key_and_source(minilm_dir):
    ckpt = load_hf_folder(minilm_dir)
    from bertscale.config import preset

    with pytest.raises(UserError, match=r"minilm: weight embeddings.word_embeddings.weight has "
                                        r"shape \(30522, 384\) but the model config needs "
                                        r"\(30522, 128\)"):
        load_pretrained(BertModel(preset("tiny")), ckpt.state_dict, "minilm")
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")
