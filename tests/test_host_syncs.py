"""The pretraining step does not wait for the GPU between reads (bertscale.training.agreement):
the step's statistics stay on the device until the loop reads them back, and the unpadded model
sizes its packed tensors from the sequence lengths the host already knows.

- On CUDA (marked `gpu`, run by benchmarks/gpu_check.sh): `bertscale pretrain` with
  `debug.forbid_host_syncs`, which runs the step code between reads under
  `torch.cuda.set_sync_debug_mode("error")` and traces explicit synchronizations.
- On the CPU, where there is nothing to synchronize with: the step's code on fake tensors (no
  data at all), where any read back of what the model computed raises; the DeepSpeed config the
  trainer resolves has DeepSpeed's synchronizing throughput timer off; the unpadded and padded
  forwards give the same numbers with host lengths as without; and a NaN/inf loss whose update was
  applied (no overflow check) is still stopped at the next read, named, with nothing saved.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertscale.training.checkpoint import layout as ckpt_lib
from bertscale.config import DebugSection, preset
from bertscale.exitcodes import NONFINITE_EXIT_CODE
from bertscale.model import BertForPreTraining, pretraining_loss
from bertscale.parallelize import FastPaths, apply_fast_paths
from pretrain_runs import manifest, pretrain, pretrain_argv, train_losses  # noqa: F401

LENGTHS = [32, 20, 3, 11]


def _cpu_batch(seed: int, T: int = 32, P: int = 5) -> dict[str, torch.Tensor]:
    """A loader-shaped micro-batch (real tokens first in each row, as bertscale's loader makes
    them)."""
    g = torch.Generator().manual_seed(seed)
    cfg = preset("tiny")
    B = len(LENGTHS)
    attention = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return {"input_ids": torch.randint(5, cfg.vocab_size, (B, T), generator=g) * attention,
            "token_type_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": attention,
            "masked_positions": torch.randint(0, 3, (B, P), generator=g),
            "masked_labels": torch.randint(5, cfg.vocab_size, (B, P), generator=g),
            "next_sentence_label": torch.tensor([0, 1, 1, -100]),
            "sample_ids": torch.arange(B)}


class _FakeDeviceEngine:
    """A stand-in for the DeepSpeed engine whose "device" holds no data: the model runs under a
    FakeTensorMode, so every tensor it computes (and every gradient) is a FakeTensor, and reading
    one back (`.item()`, `.tolist()`, `bool()`, `nonzero()`) raises DataDependentOutputException.
    What a CUDA device would make a sync, this makes an error, on the CPU."""

    def __init__(self, model: torch.nn.Module):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.model, self.device = model, torch.device("cpu")
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def __call__(self, **inputs):
        with self.mode:
            return self.model(**inputs)

    def backward(self, loss):
        loss.backward()

    def micro_step(self):
        pass


@pytest.mark.parametrize("unpad", [True, False])
def test_the_step_never_reads_back_what_the_model_computed(unpad, monkeypatch):
    """`train_step` (forward, loss, backward, the statistics of two micro-batches) on a device
    with no data: it completes, and what it returns was never read. Library call: the command
    cannot run on fake tensors. Before the fix, the unpadded forward read the lengths back
    (`.tolist()`, `nonzero()`) and the padded one its mask (`bool(mask.all())`): the same call
    without host lengths shows that this check catches it."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

    from bertscale.pretraining import step
    from bertscale.pretraining.faults import DebugHooks

    model = BertForPreTraining(preset("tiny"))
    apply_fast_paths(model, FastPaths(unpad=unpad))
    hooks = DebugHooks(DebugSection(), model, active=True)
    engine = _FakeDeviceEngine(model)
    sums, seen = step.train_step(engine, [_cpu_batch(0), _cpu_batch(1)], step=0,
                                 vocab_size=model.config.vocab_size, hooks=hooks)
    assert sums.shape == (12,) and len(seen) == 2
    assert all(isinstance(finite, FakeTensor) for finite, _ in seen)   # the NaN flags: unread
    assert all(isinstance(p.grad, FakeTensor) for p in model.parameters() if p.grad is not None)

    monkeypatch.setattr(step, "host_lengths", lambda cpu_batch: None)
    with pytest.raises(DataDependentOutputException):
        step.train_step(engine, [_cpu_batch(2)], step=0, vocab_size=model.config.vocab_size,
                        hooks=hooks)


@pytest.mark.parametrize("unpad", [True, False])
def test_host_lengths_give_the_same_forward_and_gradients(unpad, monkeypatch):
    """Host lengths change where the offsets come from, not the numbers: outputs and gradients
    equal (bit for bit) those of the path that reads the mask back, also through the sort that
    stands in for `nonzero_static` on an older CUDA build. Library call: the command cannot show
    outputs and gradients."""
    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))
    apply_fast_paths(model, FastPaths(unpad=unpad))
    b = _cpu_batch(3)

    def run(lengths):
        model.zero_grad(set_to_none=True)
        out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                    b["masked_positions"], lengths=lengths)
        loss = pretraining_loss(out, b["masked_labels"], b["next_sentence_label"]).total
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = run(None)
    for variant in ("nonzero_static", "sort"):
        if variant == "sort":
            def unavailable(*a, **k):
                raise NotImplementedError("nonzero_static: not on this device")
            monkeypatch.setattr(torch, "nonzero_static", unavailable)
        loss, grads = run(list(LENGTHS))
        assert torch.equal(loss, ref_loss), variant
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True)), variant
    full = [32] * len(LENGTHS)   # every token real: the padded path drops the mask (no read)
    b["attention_mask"] = torch.ones_like(b["attention_mask"])
    loss_full, _ = run(full)
    assert torch.equal(loss_full, run(None)[0])


def test_deepspeed_throughput_timer_is_off(capsys):
    """DeepSpeed's throughput timer, on by default, calls torch.cuda.synchronize() at every
    forward and every engine.step(). Failed before the fix: the resolved config had no "timers"
    section, so DeepSpeed's default applied (found reading DeepSpeed 0.19.8's ThroughputTimer)."""
    from bertscale.cli import main

    assert main(["pretrain", "tiny_ci", "--print-config"]) == 0
    ds = json.loads(capsys.readouterr().out)["deepspeed"]
    assert ds["timers"] == {"throughput": {"enabled": False}}


@pytest.mark.slow
def test_a_nan_between_reads_is_named_and_nothing_is_saved(manifest, tmp_path):
    """A DeepSpeed config without the gradient-norm check (`compute_grad_norm: false`, no
    clipping): the NaN loss of step 3 is not skipped by DeepSpeed, its update is applied, and the
    loop reads nothing back until step 4 (logged every 4 steps; saves at 2, 4, 6). That read, at a
    save step, comes before the save: the run stops with exit 3 naming step 3, and no checkpoint
    holds the bad weights. (With an overflow check, DeepSpeed skips the update and the read
    after the skip stops the run at once: test_pretrain.py.)"""
    config = tmp_path / "zero2_no_norm_check.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "compute_grad_norm": False},
                                  "gradient_clipping": 0.0}))
    run = tmp_path / "run"
    result = pretrain(run, manifest, 1, "train.global_batch_size=16", "train.steps=6",
                      f"train.deepspeed={json.dumps(str(config))}", "logging.every=4",
                      "checkpoint.every=2", "eval.every=0", "eval.at_start=false",
                      "debug.nan_loss_at_step=3", check=False)[0]
    assert result.returncode == NONFINITE_EXIT_CODE, result.stderr[-3000:]
    assert "error: step 3: loss is NaN/inf in 2 micro-batch(es)" in result.stdout
    assert "OVERFLOW" not in result.stderr    # DeepSpeed applied it: the bad state existed
    assert [c.step for c in ckpt_lib.list_committed(run)] == [2]
    assert not (run / "checkpoints" / "step_4").exists()
    losses = train_losses(run)
    assert sorted(losses) == [1] and all(math.isfinite(v) for v in losses.values())


@pytest.fixture(scope="module")
def prose_manifest(tmp_path_factory) -> Path:
    """Shards of real English prose that ship with Python (bertscale demo's corpus): a GPU
    machine has no ../shared. benchmarks/gpu_check.sh passes the ones its data step made."""
    if os.environ.get("BERTSCALE_PROSE_MANIFEST"):
        return Path(os.environ["BERTSCALE_PROSE_MANIFEST"])
    from bertscale.data.prepare import PrepareConfig, run_prepare
    from bertscale.demo import write_corpus
    from bertscale.tokenizer import train_wordpiece

    out = tmp_path_factory.mktemp("prose")
    corpus = out / "docs.txt"
    write_corpus(corpus)
    vocab = out / "vocab.txt"
    train_wordpiece(lambda: (p for p in corpus.read_text(encoding="utf-8").splitlines() if p),
                    vocab, vocab_size=4000, lowercase=True)
    return run_prepare(PrepareConfig(inputs=[str(corpus)], out=out / "shards", vocab=vocab,
                                     lowercase=True, seq_lens=[128], dupe_factor=1,
                                     samples_per_shard=2000, eval_fraction=0.05, seed=1,
                                     progress="none"))[128]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_step_does_not_sync_on_cuda(prose_manifest, tmp_path):
    """`bertscale pretrain` on one GPU as the GPU recipes run it (ZeRO-1 bf16, LAMB, unpadded,
    gradient accumulation 4), read back every 4 steps, with `debug.forbid_host_syncs`: every
    step after the first runs its step code under set_sync_debug_mode("error") with explicit
    synchronizations traced, and the run ends normally."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # conftest's "cpu"
    argv = pretrain_argv(tmp_path / "run", prose_manifest, "train.steps=8",
                         "train.deepspeed=\"zero1_bf16\"", "optimizer.name=\"lamb\"",
                         "optimizer.lr=1e-3", "fast.unpad=true", "logging.every=4",
                         "train.check_every=4", "checkpoint.every=0", "checkpoint.at_end=false",
                         "eval.every=0", "eval.at_start=false", "eval.samples=32",
                         "debug.forbid_host_syncs=true")
    p = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "sync check: 7 step(s) ran their step code with no host sync" in p.stdout, p.stdout
