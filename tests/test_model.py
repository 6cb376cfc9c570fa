"""The model's own properties: the paper's parameter counts, Google's initialisation, the
padding mask, the sparse MLM head. Logit parity with transformers is in test_hf_interop.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bertscale.config import preset
from bertscale.model import BertForPreTraining, BertModel, count_parameters, pretraining_loss


@pytest.mark.parametrize("name, paper_millions, low, high", [
    ("base", 110, 109e6, 111e6),
    # The paper rounds BERT-Large to 340M; the exact count of the architecture it describes
    # (30522 vocab, 512 positions) is 335M (encoder) / 336M (with heads), as in Google's release.
    ("large", 340, 334e6, 340e6),
])
def test_parameter_counts_match_the_paper_and_transformers(name, paper_millions, low, high):
    transformers = pytest.importorskip("transformers")
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        encoder, full = count_parameters(BertModel(cfg)), count_parameters(BertForPreTraining(cfg))
        hf_cfg = transformers.BertConfig(**dataclasses.asdict(cfg))
        hf_encoder = count_parameters(transformers.BertModel(hf_cfg))
        hf_full = count_parameters(transformers.BertForPreTraining(hf_cfg))
    print(f"\n[params] BERT-{name.capitalize()} (paper: {paper_millions}M): encoder {encoder:,}, "
          f"with MLM+NSP heads {full:,}; transformers {hf_encoder:,} / {hf_full:,}")
    assert (encoder, full) == (hf_encoder, hf_full)
    assert low <= encoder <= high and low <= full <= high


def test_initialisation_is_googles_truncated_normal():
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=8000)
    model = BertForPreTraining(cfg)
    std = cfg.initializer_range
    # TF's truncated_normal_initializer: N(0, std) re-drawn outside +-2 std.
    expected_std = std * scipy_stats.truncnorm(-2, 2).std()
    for name, p in model.named_parameters():
        if name.endswith("LayerNorm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert p.abs().max() <= 2 * std, name
            if p.numel() >= 100_000:
                assert abs(p.std().item() / expected_std - 1) < 0.02, name
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # Google does not zero the [PAD] row (Hugging Face does); ours is an ordinary row.
    assert model.bert.embeddings.word_embeddings.weight[cfg.pad_token_id].abs().sum() > 0


def _tiny(seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(preset("tiny", vocab_size=500)).eval()


def test_padding_is_masked_and_all_padding_rows_stay_finite():
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (2, 12), generator=g)
    with torch.no_grad():
        short = model.bert(ids).last_hidden_state                               # (2, 12, H)
        # The same sequences padded to 20 with junk ids: real positions must not change.
        padded = torch.cat([ids, torch.randint(5, 500, (2, 8), generator=g)], 1)
        am = torch.cat([torch.ones(2, 12), torch.zeros(2, 8)], 1).long()
        long = model.bert(padded, attention_mask=am).last_hidden_state
        unmasked = model.bert(padded).last_hidden_state
        empty = model(padded, attention_mask=torch.zeros_like(am),
                      masked_positions=torch.zeros(2, 3, dtype=torch.long))
    assert (long[:, :12] - short).abs().max() < 1e-5
    assert (unmasked[:, :12] - short).abs().max() > 1e-2  # so the mask did the work
    assert torch.isfinite(empty.mlm_logits).all() and torch.isfinite(empty.nsp_logits).all()


def test_sparse_head_and_loss_gradients_match_dense():
    model = _tiny(2)
    ids = torch.randint(5, 250, (3, 16))
    pos = torch.tensor([[1, 4, 0], [2, 3, 9], [5, 0, 0]])
    labels = torch.tensor([[7, 8, -100], [9, 10, 11], [12, -100, -100]])
    dense_labels = torch.full_like(ids, -100).scatter_(1, pos, labels)
    dense_labels[:, 0] = -100  # index 0 is the padding slot of `pos`
    nsp = torch.tensor([0, 1, -100])

    def grads(loss):
        model.zero_grad()
        loss.total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    sparse = pretraining_loss(model(ids, masked_positions=pos), labels, nsp)
    gs = grads(sparse)
    dense = pretraining_loss(model(ids), dense_labels, nsp)
    gd = grads(dense)
    assert abs(sparse.total.item() - dense.total.item()) < 1e-6
    assert (sparse.mlm_count.item(), sparse.nsp_count.item()) == (6, 2)
    for n in gs:
        assert torch.allclose(gs[n], gd[n], atol=1e-7, rtol=1e-5), n
    # Tied decoder: rows of tokens absent from the input (ids < 250 there) still get MLM
    # gradient, through the softmax over the whole vocabulary.
    assert gs["bert.embeddings.word_embeddings.weight"][400].abs().sum() > 0


def test_dropout_only_in_training():
    torch.manual_seed(3)
    model = BertModel(preset("tiny", vocab_size=500))
    ids = torch.randint(5, 500, (2, 10))
    am = torch.ones_like(ids)
    model.train()
    a, b = model(ids, attention_mask=am), model(ids, attention_mask=am)
    assert not torch.equal(a.last_hidden_state, b.last_hidden_state)
    model.eval()
    a, b = model(ids, attention_mask=am), model(ids, attention_mask=am)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_too_long_sequence_is_refused_by_the_model():
    """A guard against a caller's bug (the commands refuse a too-long sequence length with a
    one-line error before any forward: test_pretrain.py, test_glue.py): plain or unpadded, the
    model says what is wrong instead of indexing past its position embeddings."""
    from bertscale.parallelize import FastPaths, apply_fast_paths

    model = BertModel(preset("tiny", vocab_size=100, max_position_embeddings=16))
    ids = torch.zeros(1, 17, dtype=torch.long)
    with pytest.raises(ValueError, match="sequence length 17 exceeds model.max_position_embeddings 16"):
        model(ids)
    apply_fast_paths(model, FastPaths(unpad=True))
    with pytest.raises(ValueError, match="sequence length 17 exceeds model.max_position_embeddings 16"):
        model(ids, attention_mask=torch.ones_like(ids))
