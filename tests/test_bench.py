"""`bertscale bench` and bertscale.perf: the FLOP count against a hand count and against
torch's own FlopCounterMode, the micro-batch finder against a fake memory limit, and the model
bench's side-by-side set-up (same weights, same batch: same loss as transformers). No timing is
asserted anywhere."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bertscale.bench import model as bench_model
from bertscale.commands import bench
from bertscale.config import preset
from bertscale.errors import UserError
from bertscale.model import BertForPreTraining, pretraining_loss
from bertscale.parallelize import FastPaths, apply_fast_paths
from bertscale.perf import (find_max_micro_batch, find_micro_batch, plan_accumulation,
                            step_flops)


def _cfg():
    return preset("tiny", vocab_size=300, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)


def test_step_flops_by_hand():
    cfg = _cfg()  # L=2, H=128, I=512, V=300
    lengths, preds = [10, 4], 5
    # Dense: 2 FLOPs per weight per token, weights of Q, K, V, O (4 H^2) and the FFN (2 H I).
    encoder_weights = 2 * (4 * 128 * 128 + 2 * 128 * 512)
    dense = 2 * encoder_weights * 14
    # Attention per layer and sequence: Q K^T (L^2 H) and P V (L^2 H) multiply-adds.
    attention = 2 * 2 * 2 * 128 * (10 * 10 + 4 * 4)
    head = 2 * 5 * (128 * 128 + 128 * 300)
    pooler = 2 * 2 * (128 * 128 + 128 * 2)
    f = step_flops(cfg, lengths, preds)
    assert (f.dense, f.attention, f.mlm_head, f.pooler_nsp) == (dense, attention, head, pooler)
    assert f.train == 3 * (dense + attention + head + pooler)
    assert step_flops(cfg, lengths, preds, nsp=False).pooler_nsp == 0


def test_step_flops_equal_flop_counter_on_the_unpadded_model():
    """The unpadded path does exactly the counted work (no padding, sparse head), so torch's
    FlopCounterMode over a real forward and backward must give the same number."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = BertForPreTraining(cfg).train()
    apply_fast_paths(model, FastPaths(unpad=True))
    lengths, T, P = [16, 9, 3], 16, 2
    ids = torch.randint(5, 300, (3, T))
    am = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, :n] = 1
    pos = torch.tensor([[1, 5], [2, 8], [0, 2]])      # every slot a real prediction
    labels = torch.randint(5, 300, (3, P))
    nsp = torch.tensor([0, 1, 0])
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:       # math SDPA: attention as countable bmm
        out = model(ids, attention_mask=am, masked_positions=pos)
        forward = counter.get_total_flops()
        pretraining_loss(out, labels, nsp).total.backward()
    total = counter.get_total_flops()
    expected = step_flops(cfg, lengths, num_predictions=6)
    assert forward == expected.forward
    assert total == expected.train


def test_padded_transformers_style_work_is_more_than_model_flops():
    """What the plain padded path with a dense head computes is the model FLOPs plus padding
    and the decoder at unmasked positions: the count does not credit that work."""
    torch.manual_seed(1)
    cfg = _cfg()
    model = BertForPreTraining(cfg).eval()
    ids = torch.randint(5, 300, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 6:] = 0
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(ids, attention_mask=am)                  # dense head at all 24 positions
    padded_like = step_flops(cfg, [12, 12], num_predictions=24)
    assert counter.get_total_flops() == padded_like.forward
    assert step_flops(cfg, [12, 6], num_predictions=3).forward < padded_like.forward


def test_micro_batch_finder_with_a_fake_memory_limit():
    for budget in (1, 5, 37, 64, 1000):
        tried: list[tuple[int, bool]] = []
        best = find_max_micro_batch(lambda m, budget=budget: 3 * m <= 3 * budget, start=8, limit=512,
                                    tried=tried)
        assert best == min(budget, 512), (budget, tried)
        assert len(tried) <= 2 * 10 + 2                 # doublings + bisection, not a scan
    assert find_max_micro_batch(lambda m: False, start=4) == 0

    def try_step(m: int) -> None:
        if m > 23:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    plan = find_micro_batch(try_step, global_batch=256, world_size=2, start=4)
    assert plan.max_fits == 23 and (plan.micro_batch, plan.grad_accum) == (16, 8)
    assert (4, True) in plan.tried and (32, False) in plan.tried

    def broken(m: int) -> None:
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError, match="not a memory problem"):
        find_micro_batch(broken, global_batch=8)


def test_plan_accumulation():
    assert plan_accumulation(256, 8, 64) == (32, 1)
    assert plan_accumulation(96, 1, 40) == (32, 3)
    assert plan_accumulation(100, 4, 7) == (5, 5)
    with pytest.raises(UserError, match="not divisible by 3 ranks"):
        plan_accumulation(256, 3, 8)
    with pytest.raises(UserError, match="not even a micro-batch of 1"):
        plan_accumulation(256, 1, 0)


def _bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "model", "--preset", "tiny", "--seq-len", "32",
                              "--batch", "3", "--repeats", "1", "--warmup", "0",
                              "--num-batches", "2", "--peak-n", "128",
                              "--out", str(tmp_path / "r.json"), *extra])


def test_model_bench_compares_the_same_model_on_the_same_batch(tmp_path, capsys):
    pytest.importorskip("transformers")
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"32": [32, 20, 7, 12]}))
    args = _bench_args(tmp_path, "--unpad", "--lengths-from", str(lengths))
    assert args.func(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["results"]) == {"bertscale", "transformers", "speedup", "speedup_paired",
                                "speedup_cpu_time"}
    assert "bertscale / transformers" in capsys.readouterr().out
    # Identical weights and batch: the two models' eval-mode losses agree.
    loss = r["initial_loss"]
    assert abs(loss["bertscale"] - loss["transformers"]) < 1e-4, loss
    assert r["fill"] < 1 and r["fast_paths"]["unpad"] is True
    cfg = preset("tiny", max_position_embeddings=512)
    batches = bench_model.make_batches(cfg, 3, 32, 2, 0, lengths)
    expected = sum(step_flops(cfg, b.lengths, b.num_predictions).train for b in batches) / 2
    assert r["flops_per_step"] == pytest.approx(expected)
    for b in batches:
        assert set(b.lengths) <= {32, 20, 7, 12}
        dense = b.dense_labels()
        assert int((dense != -100).sum()) == b.num_predictions


def test_model_bench_says_when_transformers_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "import_transformers", lambda: None)
    args = _bench_args(tmp_path)
    assert args.func(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["results"]) == {"bertscale"}
    assert "transformers is not installed" in capsys.readouterr().err
    assert "transformers is not installed" in r["note"]


def test_finetune_bench_times_the_same_model_in_every_batch_shape(tmp_path, shared_data, capsys):
    """Padding to max length, dynamic padding, unpadding and transformers are the same model on
    the same real MRPC batch (equal eval losses), so their times compare like with like."""
    pytest.importorskip("transformers")
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "f.json"
    args = parser.parse_args([
        "bench", "finetune", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
        "--preset", "tiny", "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"),
        "--batch", "8", "--repeats", "1", "--warmup", "0", "--num-batches", "2",
        "--max-eval-samples", "24", "--eval-batch-size", "8", "--out", str(out)])
    assert args.func(args) == 0
    r = json.loads(out.read_text())
    assert set(r["train"]) == {"max_length", "dynamic", "unpad", "transformers"}
    assert set(r["predict"]) == {"input_order", "sorted", "sorted_unpad"}
    losses = r["first_batch_eval_loss"]
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses
    # Real MRPC pairs are far shorter than 128 tokens: the max_length variant pads a lot.
    assert r["fill_of_max_length"] < 0.7 and r["mean_padded_length_dynamic"] < 128
    assert all(x["step_s"] > 0 for x in r["train"].values())
    assert "vs max_length" in capsys.readouterr().out
