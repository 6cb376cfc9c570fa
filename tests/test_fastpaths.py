"""Every fast path against the plain path (which test_hf_interop.py ties to transformers), each
switched the way the product switches it, through bertscale.parallelize.apply_fast_paths: same
outputs at real positions, same loss, same gradients. fp32 on the CPU; the CUDA-only
variable-length flash kernel has its own test, skipped without a GPU. (Library calls: what the
commands cannot show is the model's outputs and gradients; test_pretrain.py and
test_finetune_fastpaths.py run the same switches through `bertscale pretrain` and `finetune`.)"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from bertscale.config import preset
from bertscale.errors import UserError
from bertscale.model import (BertForPreTraining, BertForQuestionAnswering,
                             BertForSequenceClassification, BertModel, pretraining_loss)
from bertscale.parallelize import FastPaths, apply_fast_paths, compile_failure

V = 700


def _cfg(dropout: float = 0.0, **kw):
    # initializer_range 0.05: activations large enough that a wrong path shows up clearly.
    return preset("tiny", vocab_size=V, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, initializer_range=0.05, **kw)


def _batch(seed: int = 0, lengths=(32, 17, 5, 1, 24), T: int = 32):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(5, V, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.long)
    tt = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, :n] = 1
        tt[b, n // 2:n] = 1
    ids[am == 0] = 0
    # Masked positions inside each sequence (slot 0 = padding slot, label -100).
    P = 4
    pos = torch.zeros(B, P, dtype=torch.long)
    labels = torch.full((B, P), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        k = min(P, n)
        pos[b, :k] = torch.randperm(n, generator=g)[:k]
        labels[b, :k] = torch.randint(5, V, (k,), generator=g)
    nsp = torch.tensor([0, 1, 1, 0, -100][:B])
    return ids, tt, am, pos, labels, nsp


def _loss_and_grads(model, batch):
    ids, tt, am, pos, labels, nsp = batch
    model.zero_grad(set_to_none=True)
    out = model(ids, tt, am, masked_positions=pos)
    loss = pretraining_loss(out, labels, nsp)
    loss.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss, grads


def _assert_same(a, b, atol=2e-6, what=""):
    assert a.shape == b.shape, what
    d = (a - b).abs().max().item()
    assert d <= atol, f"{what}: max|diff| {d:.2e} > {atol:.0e}"


def test_unpad_matches_plain_outputs_loss_and_gradients():
    torch.manual_seed(0)
    model = BertForPreTraining(_cfg()).train()  # train mode: the training code path, dropout 0
    batch = _batch()
    out0, loss0, g0 = _loss_and_grads(model, batch)
    apply_fast_paths(model, FastPaths(unpad=True))
    out1, loss1, g1 = _loss_and_grads(model, batch)
    _assert_same(out0.mlm_logits, out1.mlm_logits, what="MLM logits")
    _assert_same(out0.nsp_logits, out1.nsp_logits, what="NSP logits")
    assert abs(loss0.total.item() - loss1.total.item()) < 1e-6
    assert (loss0.mlm_correct, loss0.nsp_correct) == (loss1.mlm_correct, loss1.nsp_correct)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        _assert_same(g0[name], g1[name], atol=1e-6, what=f"grad {name}")
    # The embedding rows of padding-only ids get no gradient once padding is dropped, exactly
    # as in the plain path (padded positions never reach the loss): same values, checked above.


def test_unpad_encoder_outputs_with_holes_and_left_padding():
    torch.manual_seed(1)
    model = BertModel(_cfg()).eval()
    ids, tt, am, *_ = _batch(seed=1)
    am[0, :3] = 0     # left padding
    am[4, 10:12] = 0  # a hole in the middle
    with torch.no_grad():
        plain = model(ids, tt, am, output_hidden_states=True)
        apply_fast_paths(model, FastPaths(unpad=True))
        fast = model(ids, tt, am, output_hidden_states=True)
    real = am.bool()
    for i, (h0, h1) in enumerate(zip(plain.hidden_states, fast.hidden_states)):
        _assert_same(h0[real], h1[real], what=f"hidden state {i}")
        assert torch.all(h1[~real] == 0)  # documented: padded positions are zeros
    _assert_same(plain.last_hidden_state[real], fast.last_hidden_state[real])
    # No mask: the fast path does not apply; the result is the plain one bit for bit.
    with torch.no_grad():
        assert torch.equal(model(ids, tt).last_hidden_state,
                           BertModel.forward(model, ids, tt).last_hidden_state)


@pytest.mark.parametrize("cls, args", [(BertForSequenceClassification, (3,)),
                                       (BertForQuestionAnswering, ())])
def test_unpad_finetuning_heads(cls, args):
    torch.manual_seed(2)
    plain = cls(_cfg(), *args).eval()
    fast = cls(_cfg(), *args).eval()
    apply_fast_paths(fast, FastPaths(unpad=True))
    fast.load_state_dict(plain.state_dict())
    ids, tt, am, *_ = _batch(seed=2)
    with torch.no_grad():
        a, b = plain(ids, tt, am), fast(ids, tt, am)
    if isinstance(a, tuple):  # QA: per-token logits, compared at real tokens
        real = am.bool()
        a, b = torch.stack(a)[:, real], torch.stack(b)[:, real]
    _assert_same(a, b)


def test_flash_varlen_is_refused_where_it_cannot_run():
    """No command lets a user ask for the flash kernel (it is library API): asking for it where
    it cannot run is a programming error, refused at the first forward."""
    model = BertModel(_cfg())
    apply_fast_paths(model, FastPaths(unpad=True, varlen_attention="flash"))
    ids, tt, am, *_ = _batch()
    with pytest.raises(ValueError, match="varlen_attention 'flash' needs CUDA"):
        model(ids, tt, am)
    with pytest.raises(UserError, match="varlen_attention 'bogus'"):
        FastPaths(varlen_attention="bogus").validate()


def test_activation_checkpointing_matches_plain_with_dropout_on():
    # Dropout on: recomputation must replay the same masks (RNG state restored).
    torch.manual_seed(3)
    model = BertForPreTraining(_cfg(dropout=0.1)).train()
    batch = _batch(seed=3)
    torch.manual_seed(123)
    _, loss0, g0 = _loss_and_grads(model, batch)
    apply_fast_paths(model, FastPaths(checkpoint_activations=True))
    torch.manual_seed(123)
    _, loss1, g1 = _loss_and_grads(model, batch)
    assert loss0.total.item() == loss1.total.item()
    for name in g0:
        _assert_same(g0[name], g1[name], atol=1e-7, what=f"grad {name}")
    # And it did checkpoint: the saved activations of the forward are fewer.
    def saved_bytes(fast):
        apply_fast_paths(model, fast)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ids, tt, am, pos, *_ = batch
            model(ids, tt, am, masked_positions=pos)
        return total
    assert saved_bytes(FastPaths(checkpoint_activations=True)) < 0.5 * saved_bytes(FastPaths())


def test_compile_matches_eager_and_keeps_the_state_dict():
    torch.manual_seed(4)
    model = BertForPreTraining(_cfg()).train()
    keys = list(model.state_dict())
    batch = _batch(seed=4, lengths=(32, 32, 20, 9, 32))
    _, loss0, g0 = _loss_and_grads(model, batch)
    compiled_frames = []

    def aot_eager(gm, example_inputs):  # counts what was compiled, then compiles it
        compiled_frames.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    apply_fast_paths(model, FastPaths(compile=True, compile_backend=aot_eager))
    with warnings.catch_warnings():  # no fallback warning: it really compiled
        warnings.filterwarnings("error", message="torch.compile", category=RuntimeWarning)
        _, loss1, g1 = _loss_and_grads(model, batch)
    assert compiled_frames and compile_failure(model) is None
    assert list(model.state_dict()) == keys
    assert abs(loss0.total.item() - loss1.total.item()) < 1e-6
    for name in g0:
        _assert_same(g0[name], g1[name], atol=1e-6, what=f"grad {name}")


def test_compile_failure_warns_once_and_runs_eager():
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("backend exploded")

    torch.manual_seed(5)
    model = BertForPreTraining(_cfg()).eval()
    batch = _batch(seed=5)
    ids, tt, am, pos, *_ = batch
    with torch.no_grad():
        ref = model(ids, tt, am, masked_positions=pos).mlm_logits
        apply_fast_paths(model, FastPaths(compile=True, compile_backend=broken_backend,
                                          unpad=True))
        with pytest.warns(RuntimeWarning, match="backend exploded") as record:
            out = model(ids, tt, am, masked_positions=pos).mlm_logits
        assert len(record) == 1 and calls
        assert compile_failure(model).startswith("backend 'broken_backend': ")
        assert "backend exploded" in compile_failure(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.compile", category=RuntimeWarning)
            again = model(ids, tt, am, masked_positions=pos).mlm_logits
    _assert_same(ref, out)
    assert torch.equal(out, again)


def test_fast_paths_are_not_model_config():
    # ModelConfig mirrors config.json; the switches live elsewhere.
    names = {f.name for f in dataclasses.fields(_cfg())}
    assert not names & {f.name for f in dataclasses.fields(FastPaths)}
    with pytest.raises(ValueError, match="holds no BertModel"):
        apply_fast_paths(torch.nn.Linear(2, 2), FastPaths())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_varlen_matches_per_sequence_on_cuda():
    torch.manual_seed(6)
    cfg = preset("mini", vocab_size=V, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg).cuda().train()
    batch = [t.cuda() for t in _batch(seed=6, T=64, lengths=(64, 40, 3, 17, 64))]
    results = {}
    for kernel in ("per_sequence", "flash"):
        apply_fast_paths(model, FastPaths(unpad=True, varlen_attention=kernel))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[kernel] = _loss_and_grads(model, batch)
    (_, l0, g0), (_, l1, g1) = results["per_sequence"], results["flash"]
    assert abs(l0.total.item() - l1.total.item()) < 2e-2
    for name in g0:
        rel = (g0[name] - g1[name]).norm() / g0[name].norm().clamp(min=1e-12)
        assert rel < 5e-2, name


def test_padded_vocab_gives_the_unpadded_loss_gradients_and_predictions():
    """fast.pad_vocab_multiple: a model with rows past the vocabulary, whose real rows are the
    unpadded model's, has the same MLM/NSP loss, the same gradients on every shared weight and
    the same predictions, even with the padded rows' decoder bias set to win every argmax: the
    padded rows are never predicted. (The trainer passes the tokenizer's size as vocab_size.)"""
    from bertscale.config import padded_vocab_size

    torch.manual_seed(0)
    plain = BertForPreTraining(_cfg()).train()
    padded_v = padded_vocab_size(V, 64)
    assert padded_v == 704 and padded_vocab_size(30522, 64) == 30528 and padded_vocab_size(64, 64) == 64
    padded = BertForPreTraining(dataclasses.replace(_cfg(), vocab_size=padded_v)).train()
    with torch.no_grad():
        for (name, p), q in zip(padded.named_parameters(), plain.parameters()):
            if p.shape == q.shape:
                p.copy_(q)
            else:                           # the vocabulary rows: real ones equal, extra ones loud
                p[:V].copy_(q)
                p[V:].fill_(50.0 if name.endswith("bias") else 0.3)
    batch = _batch()
    ids, tt, am, pos, labels, nsp = batch
    out0, loss0, g0 = _loss_and_grads(plain, batch)
    padded.zero_grad(set_to_none=True)
    out1 = padded(ids, tt, am, masked_positions=pos)
    assert out1.mlm_logits.shape[-1] == padded_v
    loss1 = pretraining_loss(out1, labels, nsp, vocab_size=V)
    loss1.total.backward()
    _assert_same(loss1.total, loss0.total, atol=1e-6, what="loss")
    assert int(loss1.mlm_correct) == int(loss0.mlm_correct)
    # Without vocab_size the padded rows' huge bias would take every prediction.
    assert int(pretraining_loss(out1, labels, nsp).mlm_correct) == 0
    for name, p in padded.named_parameters():
        want = g0[name]
        got = p.grad[:V] if p.grad.shape != want.shape else p.grad
        _assert_same(got, want, atol=2e-6, what=name)


def test_checkpointing_and_compile_together_then_switched_back():
    """Both runtime fast paths at once (the backward recomputes the compiled layers) give the
    plain loss and gradients; apply_fast_paths replaces what it applied before, so the plain
    switches give back the plain model bit for bit; no switch adds, drops or renames a key."""
    torch.manual_seed(7)
    model = BertForPreTraining(_cfg()).train()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    batch = _batch(seed=7)
    _, loss0, g0 = _loss_and_grads(model, batch)
    apply_fast_paths(model, FastPaths(checkpoint_activations=True, compile=True,
                                      compile_backend="aot_eager"))
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    with warnings.catch_warnings():  # no fallback warning: it really compiled
        warnings.filterwarnings("error", message="torch.compile", category=RuntimeWarning)
        _, loss1, g1 = _loss_and_grads(model, batch)
    assert compile_failure(model) is None
    assert abs(loss0.total.item() - loss1.total.item()) < 1e-6
    for name in g0:
        _assert_same(g0[name], g1[name], atol=1e-6, what=f"grad {name}")
    apply_fast_paths(model, FastPaths())
    assert all("forward" not in layer.__dict__ for layer in model.bert.encoder.layer)
    _, loss2, g2 = _loss_and_grads(model, batch)
    assert loss2.total.item() == loss0.total.item()
    assert all(torch.equal(g0[name], g2[name]) for name in g0)
