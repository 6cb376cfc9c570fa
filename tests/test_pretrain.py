"""The pretraining loop, end to end: real Wikipedia shards, real DeepSpeed ranks on loopback.

What is checked, against what reference:
- a tiny BERT learns (held-out MLM loss and accuracy at step 0 vs the end, chance = 1/vocab);
- same-size resume reproduces the uninterrupted run EXACTLY in fp32 (world size 1: stop at k and
  resume; world size 2: preempted by a signal to ONE rank, then resumed), and within a stated
  tolerance in bf16;
- ZeRO-1 and ZeRO-3 give the ZeRO-2 run's losses (same math, another partitioning);
- a NaN loss stops every rank before the optimizer step, names the batch's sample ids (checked
  against the loader), and leaves no checkpoint for the bad step;
- bad batch geometry / DeepSpeed JSON / precision are refused before any process group exists.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertscale.training.checkpoint import layout as ckpt_lib
from bertscale.training.checkpoint.consolidated import load_consolidated
from bertscale.training.checkpoint.state import read_state
from bertscale.exitcodes import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE
from launch import free_port
from pretrain_runs import (BF16, BF16_RTOL, WS2, manifest, plain_eval, prepare_wiki,  # noqa: F401
                           pretrain, pretrain_argv, records, train_losses, two_rank_env,
                           ws1_runs, ws2_straight, zero_runs)

pytestmark = pytest.mark.slow

def test_tiny_bert_learns_on_wikipedia(ws1_runs, manifest):
    run, _ = ws1_runs
    evals = records(run, "eval")
    first, last = evals[0], evals[-1]
    vocab = len((run / "vocab.txt").read_text().splitlines())
    assert (first["step"], last["step"]) == (0, 30)
    # Untrained: MLM loss ~ ln(vocab), accuracy ~ chance; trained: far below / far above.
    assert abs(first["mlm_loss"] - math.log(vocab)) < 0.5
    assert first["mlm_acc"] < 10 / vocab
    assert last["mlm_loss"] < first["mlm_loss"] - 2.0, (first, last)
    assert last["mlm_acc"] > 0.03 > 500 / vocab, (first, last)
    train = records(run, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 2.0
    for key in ("samples_per_s", "tokens_per_s", "tflops", "lr", "grad_norm"):
        assert train[-1][key] > 0 or key == "lr", key
    assert train[-1]["consumed_samples"] == 30 * 16
    # Keep-K: every 5 steps, keep 2 -> only the two newest are committed (and present).
    assert [c.step for c in ckpt_lib.list_committed(run)] == [25, 30]
    folders = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step_25", "step_30"]
    # The run folder carries its tokenizer.
    assert (run / "vocab.txt").read_bytes() == (manifest.parent / "vocab.txt").read_bytes()


def test_resume_is_exact_at_world_size_1(ws1_runs):
    straight, resumed = ws1_runs
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical, fp32
    assert records(straight, "eval")[-1] == {**records(resumed, "eval")[-1],
                                             "time": records(straight, "eval")[-1]["time"]}
    latest = ckpt_lib.latest_committed(resumed)
    state = read_state(latest)
    assert (latest.step, state.components["data"]["consumed_samples"]) == (30, 480)
    # The data position a checkpoint stores is the loader's own state dict, whole.
    assert state.components["data"] == {
        "consumed_samples": 480, "seed": state.run["recipe"]["train"]["seed"],
        "manifest_fingerprint": state.run["manifest_fingerprint"], "split": "train"}


def _start_ranks(argv: list[str], world: int) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def test_preemption_signal_to_one_rank_then_exact_resume(ws2_straight, manifest, tmp_path):
    """Logged every 2 steps: the ranks read their statistics and the preemption flags back only
    at even steps, so the signal is acted on at the next even step, by both ranks."""
    run = tmp_path / "preempted"
    procs = _start_ranks(pretrain_argv(run, manifest, *WS2, "logging.every=2"), 2)
    try:
        out0 = ""
        deadline = time.monotonic() + 300
        while "step 2/8" not in out0:  # both ranks are past init: their handlers are installed
            assert time.monotonic() < deadline and procs[0].poll() is None, out0
            if select.select([procs[0].stdout], [], [], 1.0)[0]:
                out0 += procs[0].stdout.readline()
        procs[1].send_signal(signal.SIGUSR1)  # ONE rank only
        rest = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out0 += rest[0][0]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, rest[0][1][-2000:]
    stopped = ckpt_lib.latest_committed(run)
    assert stopped is not None and 2 <= stopped.step < 8, out0
    assert f"preempted (SIGUSR1 on rank 1): checkpoint step {stopped.step} committed" in out0
    assert stopped.step % 2 == 0                    # at a read
    assert max(train_losses(run)) == stopped.step  # stopped at that step boundary

    results = pretrain(run, manifest, 2, *WS2, "logging.every=2", extra=("--resume", "require"),
                       watch_exit=True)
    assert f"resumed from {stopped.path} (step {stopped.step}" in results[0].stdout
    # The finished ranks ended their process groups before the interpreter's teardown, where
    # their threads abort the process now and then (exit -6 after a finished run).
    assert [r.group_threads_at_exit for r in results] == [[], []]
    a, b = train_losses(ws2_straight), train_losses(run)
    # Even steps, step 1, and the first step after the resume.
    assert sorted(b) == sorted({1, 2, 4, 6, 8, stopped.step + 1})
    assert [a[s] for s in b] == [b[s] for s in b]  # bit-identical across the preemption
    assert records(ws2_straight, "eval")[-1]["mlm_loss"] == records(run, "eval")[-1]["mlm_loss"]


def test_zero_stages_1_and_3_train_like_zero_2(ws2_straight, zero_runs):
    ref = train_losses(ws2_straight)
    for stage, run in zero_runs.items():
        losses = train_losses(run)
        assert sorted(losses) == [1, 2, 3, 4]
        state = read_state(ckpt_lib.latest_committed(run))
        assert state.run["zero_stage"] == stage
        for step, loss in losses.items():  # same math, other partitioning and reduction order
            assert loss == pytest.approx(ref[step], rel=1e-5), (stage, step)
        assert losses[4] < losses[1] - 0.05  # and it trains (step 1 has lr 0: warmup)


def test_bf16_resume_within_tolerance(manifest, tmp_path):
    straight, resumed = tmp_path / "bf16", tmp_path / "bf16_resumed"
    pretrain(straight, manifest, 1, *BF16)
    pretrain(resumed, manifest, 1, *BF16, extra=("--stop-at-step", "3"))
    pretrain(resumed, manifest, 1, *BF16)
    latest = ckpt_lib.latest_committed(resumed)
    assert (read_state(latest).run["precision"], latest.step) == ("bf16", 6)
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=BF16_RTOL), s
    assert a[6] < a[1]


def test_nan_loss_stops_every_rank_without_a_checkpoint(manifest, tmp_path, monkeypatch):
    from bertscale.data.loader import LoaderConfig, open_loader

    run = tmp_path / "nan"
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the recipe decides: W&B offline
    # LAMB under ZeRO-1 (made ZeRO-aware by the loop), NaN injected into step 3 on rank 0.
    results = pretrain(run, manifest, 2, "optimizer.name=\"lamb\"", "optimizer.lr=1e-3",
                       "train.deepspeed=\"zero1_fp32\"", "train.steps=6", "checkpoint.every=1",
                       "eval.at_start=false", "eval.every=0", "debug.nan_loss_at_step=3",
                       "logging.wandb=true", "logging.wandb_mode=\"offline\"", check=False,
                       watch_exit=True)
    assert [r.returncode for r in results] == [NONFINITE_EXIT_CODE] * 2, results[0].stderr[-2000:]
    assert [r.group_threads_at_exit for r in results] == [[], []]  # also on the error path
    assert "error: step 3: loss is NaN/inf in 2 micro-batch(es)" in results[0].stdout
    assert [c.step for c in ckpt_lib.list_committed(run)] == [1, 2]
    assert not (run / "checkpoints" / "step_3").exists()
    assert max(train_losses(run)) == 2 and all(math.isfinite(v) for v in train_losses(run).values())
    # The ids reported are those of rank 0's micro-batches of step 3 (global batch 2).
    line = next(x for x in results[0].stderr.splitlines() if "non-finite loss; batch sample_ids" in x)
    reported = json.loads(line.split("sample_ids ", 1)[1])
    loader = open_loader(manifest, LoaderConfig(
        split="train", global_batch_size=32, micro_batch_size=8, rank=0, world_size=2, seed=1234,
        consumed_samples=2 * 32, verify_sha256=False))
    batches = iter(loader)
    expected = [i for _ in range(2) for i in next(batches)["sample_ids"].tolist()]
    assert reported == expected
    assert "non-finite" not in results[1].stderr  # rank 1's batches were fine; it stopped anyway
    # W&B (offline: no key, no network) logged the run and was closed on the failure path.
    assert list((run / "wandb").glob("offline-run-*")) and (run / "wandb_id.txt").is_file()


def test_phase2_starts_from_phase1_weights_with_fresh_state(ws1_runs, shared_data, tmp_path):
    from bertscale.data.masking import MaskingConfig
    from bertscale.model import BertForPreTraining

    phase1 = ws1_runs[0]
    seq512 = prepare_wiki(shared_data, tmp_path / "seq512", seq_len=512)
    run = tmp_path / "phase2"
    results = pretrain(run, seq512, 1, f"train.init_from={json.dumps(str(phase1))}",
                       "data.max_predictions_per_seq=80", "train.steps=2", "schedule.warmup=0",
                       "train.micro_batch_size=4", "eval.every=0", "eval.samples=16",
                       "eval.micro_batch_size=4")
    assert f"initialised from {phase1 / 'checkpoints' / 'step_30'} (step 30 weights)" in results[0].stdout
    # Its step-0 evaluation (512-token data) is phase 1's final weights, redone in plain PyTorch.
    weights = load_consolidated(phase1)
    model = BertForPreTraining(weights.config)
    model.load_state_dict(weights.state_dict)
    mine = plain_eval(model, seq512, micro=4, seed=1234, samples=16,
                      masking=MaskingConfig(max_predictions_per_seq=80))
    start = records(run, "eval")[0]
    assert start["step"] == 0 and start["mlm_loss"] == pytest.approx(mine["mlm_loss"], rel=1e-5)
    assert start["mlm_acc"] > 0.03  # not a fresh model (that would be ~0)
    # Weights only: the step counter, data position and schedule start again.
    latest = ckpt_lib.latest_committed(run)
    state = read_state(latest)
    assert (latest.step, state.components["data"]["consumed_samples"],
            state.run["seq_len"]) == (2, 2 * 32, 512)
    assert records(run, "train")[0]["lr"] == 2e-3  # no warmup: the new schedule's peak


# ------------------------------------------------------------------------ refused before start


def _cli(args: list[str]) -> int:
    from bertscale.cli import main
    return main(args)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sets, message", [
    (["train.global_batch_size=48", "train.micro_batch_size=16"],
     "global batch 48 is not divisible by micro batch 16 x 2 ranks; with micro batch 16 it "
     "works on 1, 3 ranks"),
    (["train.deepspeed=\"zero2_fp16\""], "enables fp16, which DeepSpeed supports only on GPUs"),
    (["schedule.warmup=100", "train.steps=10"], "schedule.warmup 100 is longer than train.steps 10"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be positive"),
    (["trian.steps=3"], "unknown section or field 'trian'"),
    (["checkpoint.keep=1"], "checkpoint.keep must be at least 2"),
    (["data.max_predictions_per_seq=500"],
     "data.max_predictions_per_seq = 500 is more than the 125 maskable tokens of a 128-token"),
    (["eval.max_batches=8"], "eval.max_batches was replaced by eval.samples"),
    (["model.max_position_embeddings=64"],
     "the shards hold 128-token sequences but model.max_position_embeddings is 64"),
])
def test_bad_recipe_is_refused_before_the_process_group(manifest, tmp_path, two_rank_env, capsys,
                                                        sets, message):
    args = ["pretrain", "tiny_ci", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.manifest={json.dumps(str(manifest))}"]
    for s in sets:
        args += ["--set", s]
    assert _cli(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.timeout(120)
def test_deepspeed_json_with_conflicting_batch_is_refused(manifest, tmp_path, two_rank_env, capsys):
    ds = json.loads((Path(__file__).parent.parent / "deepspeed_configs" / "zero2_fp32.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(ds))
    assert _cli(["pretrain", "tiny_ci", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.manifest={json.dumps(str(manifest))}",
                 "--set", f"train.deepspeed={json.dumps(str(path))}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: sets train_micro_batch_size_per_gpu = 4, but the recipe gives 8" in err


# ------------------------------------------------------------------------------- the demo


def test_demo_runs_the_whole_pipeline_offline(tmp_path, capfd):
    """`bertscale demo` end to end, shortened to 4 steps (the full demo is timed by hand: see
    the closing note). The corpus must be real prose from Python's own documentation."""
    from bertscale.cli import main

    root = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(root), "--steps", "4", "--set", "schedule.warmup=1"]) == 0
    out = capfd.readouterr().out
    assert "MLM accuracy (held-out): 0.0% at step 0" in out
    assert "NSP accuracy (held-out)" in out and "always answering the commoner label" in out
    lines = (root / "data" / "python_docs.txt").read_text(encoding="utf-8").splitlines()
    prose = [x for x in lines if x]
    assert len(prose) > 5000 and sum(map(len, prose)) > 1_000_000
    assert sum(x.endswith((".", ":", ")", "?", "!")) for x in prose) > 0.9 * len(prose)
    assert not any(x.startswith((">>>", "   ")) for x in prose)  # no code examples
    assert any("assert statement" in x for x in prose)  # the Language Reference is in it
    assert len((root / "tokenizer" / "vocab.txt").read_text().splitlines()) == 8000
    run = root / "run"
    assert ckpt_lib.latest_committed(run).step == 4
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [0, 4]


@pytest.mark.parametrize("name, world, accum", [
    ("bert_large_phase1", 64, 16), ("bert_large_phase2", 64, 32),
    ("bert_base_phase1", 8, 1), ("bert_base_phase2", 8, 2), ("demo", 2, 1), ("tiny_ci", 2, 2)])
def test_builtin_recipes_are_valid(name, world, accum):
    from bertscale.config import load_pretrain_recipe
    from bertscale.optim import warmup_steps
    from bertscale.pretraining.plan import deepspeed_config

    recipe = load_pretrain_recipe(name)
    cfg, path, precision, stage, got = deepspeed_config(recipe, world, cuda=True)
    assert got == accum
    assert cfg["train_batch_size"] == recipe.train.global_batch_size
    assert cfg["train_micro_batch_size_per_gpu"] * accum * world == recipe.train.global_batch_size
    assert warmup_steps(recipe.schedule, recipe.train.steps) <= recipe.train.steps
    if name.startswith("bert_large"):  # NVIDIA's LAMB recipe
        assert (recipe.optimizer.name, precision) == ("lamb", "bf16")
    if name.startswith("bert_"):  # the GPU recipes: what is fastest on GPUs (docs/pretraining.md)
        assert (stage, precision) == (1, "bf16") and cfg["data_types"]["grad_accum_dtype"] == "fp32"
        assert recipe.fast.unpad and recipe.fast.tf32 and not recipe.fast.compile
    if name.endswith("phase2"):
        assert recipe.train.init_from is not None and recipe.data.max_predictions_per_seq == 80


def test_model_flops_match_torch_flop_counter():
    """The TFLOP/s and MFU figures count what torch's own FLOP counter counts for one forward +
    backward of the model (attention through the math kernel, which the counter can see)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bertscale.config import preset
    from bertscale.model import BertForPreTraining, pretraining_loss
    from bertscale.perf import step_flops

    cfg = preset("tiny", vocab_size=1000)
    model = BertForPreTraining(cfg)
    B, T, P = 3, 64, 10
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (B, T), generator=g)
    pos = torch.stack([torch.randperm(T, generator=g)[:P].sort().values for _ in range(B)])
    labels = torch.randint(5, 1000, (B, P), generator=g)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(ids, torch.zeros_like(ids), None, pos)
        pretraining_loss(out, labels, torch.tensor([0, 1, 0])).total.backward()
    assert counter.get_total_flops() == step_flops(cfg, [T] * B, num_predictions=B * P).train


def test_fast_paths_train_like_the_plain_path(manifest, tmp_path):
    """[fast] reaches the model: unpadding + activation checkpointing give the plain run's losses
    (dropout off, so both consume the same randomness; fp32 so only summation order differs)."""
    no_dropout = ("model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    pretrain(plain, manifest, 1, *WS2, *no_dropout, extra=("--stop-at-step", "4"))
    pretrain(fast, manifest, 1, *WS2, *no_dropout, "fast.unpad=true",
             "fast.checkpoint_activations=true", extra=("--stop-at-step", "4"))
    a, b = train_losses(plain), train_losses(fast)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert json.loads((fast / "recipe.json").read_text())["fast"]["unpad"] is True


def test_fast_paths_under_zero3_on_two_ranks(manifest, tmp_path):
    """Activation checkpointing recomputes each layer in the backward; under ZeRO-3 the layer's
    parameters are partitioned again by then and must be gathered once more. Two ranks, ZeRO-3:
    unpadding + checkpointing give the plain run's losses."""
    sets = (*WS2, "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0",
            "train.deepspeed=\"zero3_fp32\"")
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    pretrain(plain, manifest, 2, *sets, extra=("--stop-at-step", "3"))
    pretrain(fast, manifest, 2, *sets, "fast.unpad=true", "fast.checkpoint_activations=true",
             extra=("--stop-at-step", "3"))
    a, b = train_losses(plain), train_losses(fast)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert len(set(a.values())) == 3             # the model trains: losses move
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_each_rank_hashes_its_share_of_the_shards(manifest, monkeypatch):
    """verify_shards: over the ranks of a job every shard is hashed exactly once."""
    from bertscale.data import loader as loader_module
    from bertscale.data.shards import read_manifest

    m = read_manifest(manifest)
    hashed: list[str] = []
    real = loader_module.sha256_file
    monkeypatch.setattr(loader_module, "sha256_file", lambda p: (hashed.append(Path(p).name), real(p))[1])
    names = [s.name for s in m.shards["train"]]
    assert len(names) >= 3
    for world in (1, 2, 3):
        hashed.clear()
        shares = []
        for rank in range(world):
            before = len(hashed)
            assert loader_module.verify_shards(m, "train", rank, world) == []
            shares.append(hashed[before:])
        # Every shard once across the ranks, none twice.
        assert sorted(hashed) == sorted(Path(m.shard_location("train", i)).name
                                        for i in range(len(names)))
        assert all(len(s) >= len(names) // world for s in shares)  # and shared out


def test_a_corrupt_shard_stops_every_rank_with_its_name(manifest, tmp_path):
    """The shard hashed by rank 1 only is damaged: both ranks stop with the same message, which
    names the shard and the rank that found it, before any step or checkpoint."""
    import shutil

    from bertscale.data.shards import read_manifest

    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)
    copy = data / manifest.name
    m = read_manifest(copy)
    victim = Path(m.shard_location("train", 1))          # shard 1: rank 1's share of 2
    assert victim.is_relative_to(data)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                            # same size, different bytes
    victim.write_bytes(bytes(raw))
    results = pretrain(tmp_path / "run", copy, 2, *WS2, check=False)
    assert [r.returncode for r in results] == [2, 2], results[0].stderr[-2000:]
    for r in results:
        assert f"shard {m.shards['train'][1].name}" in r.stderr, r.stderr[-2000:]
        assert "differs from the manifest's" in r.stderr and "(found by rank 1)" in r.stderr
    assert ckpt_lib.latest_committed(tmp_path / "run") is None
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not train_losses(tmp_path / "run")


def test_padded_vocab_trains_and_exports_the_real_vocabulary(manifest, tmp_path):
    """`fast.pad_vocab_multiple = 64` through the CLI: the run's model has 30,528 rows for the
    30,522-token vocabulary; `bertscale export` writes a Hugging Face folder of the real size that
    transformers loads with no missing or mismatched weights and whose logits are the run's
    (the consolidated weights' real rows) for real text."""
    import transformers

    from bertscale.model import BertForPreTraining

    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    pretrain(run, manifest, 1, "train.steps=2", "schedule.warmup=1", "checkpoint.every=2",
             "eval.every=2", "eval.at_start=false", "eval.samples=16", "fast.pad_vocab_multiple=64")
    state = read_state(ckpt_lib.latest_committed(run))
    assert state.run["model_config"]["vocab_size"] == 30528
    assert records(run, "eval")[-1]["mlm_acc"] >= 0  # evaluated over the real vocabulary
    done = subprocess.run([sys.executable, "-m", "bertscale.cli", "export", "--from", str(run),
                           "--to", str(hf_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 30522
    hf, info = transformers.BertForPreTraining.from_pretrained(hf_dir, output_loading_info=True,
                                                               attn_implementation="eager")
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    weights = load_consolidated(run)
    ours = BertForPreTraining(weights.config).eval()
    ours.load_state_dict(weights.state_dict)
    ids = torch.tensor([[101, 7592, 2088, 2003, 2307, 1012, 102, 2009, 2003, 102]])
    tt = torch.tensor([[0] * 7 + [1] * 3])
    am = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, token_type_ids=tt, attention_mask=am)
        out = ours(ids, tt, am)
    assert (out.mlm_logits[..., :30522] - ref.prediction_logits).abs().max() < 1e-4
    assert (out.nsp_logits - ref.seq_relationship_logits).abs().max() < 1e-4
