"""The shipped DeepSpeed configs (deepspeed_configs/*.json), built into the real DeepSpeed engine
on the CPU (DS_ACCELERATOR=cpu, gloo, one process): every bf16 config accumulates gradients in
fp32, and a numeric test shows what bf16 accumulation would lose.

The engine is built by tests/workers/ds_config_worker.py through `bertscale pretrain`'s own
config reader (batch fields injected as in a run), in one process for all configs; the engine's
data types are not visible from the command line, hence a library-level worker. fp16 configs
cannot be built on a CPU (DeepSpeed refuses fp16 there): for them the test checks what the
file says, and that the trainer refuses them on a CPU before starting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bertscale.config import load_pretrain_recipe
from bertscale.errors import ConfigError
from bertscale.pretraining.plan import DEEPSPEED_CONFIG_DIR, deepspeed_config
from pretrain_runs import manifest  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "workers" / "ds_config_worker.py"
CONFIGS = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
CPU_CONFIGS = [c for c in CONFIGS if "fp16" not in c]
# The worker's gradients (see its docstring): one micro-batch of 1/4, 63 of 1/4/512, averaged.
FP32_SUM = 2.0 ** -8 * (1 + 63 / 512)
BF16_SUM = 2.0 ** -8          # every small term lost


@pytest.fixture(scope="module")
def engines() -> dict[str, dict]:
    args = [*CPU_CONFIGS, "zero2_bf16:no_accum_dtype", "zero3_bf16:no_accum_dtype"]
    p = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "RANK": "0", "WORLD_SIZE": "1",
                                         "LOCAL_RANK": "0", "MASTER_PORT": _port()})
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and len(rows) == len(args), p.stdout[-2000:] + p.stderr[-4000:]
    return {r["name"]: r for r in rows}


def _port() -> str:
    from launch import free_port
    return str(free_port())


def test_every_shipped_config_is_covered():
    assert len(CONFIGS) >= 11 and set(CONFIGS) - set(CPU_CONFIGS) == {
        "zero1_fp16", "zero2_fp16", "zero3_fp16"}


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_engine_accumulates_in_fp32(engines, name):
    r = engines[name]
    assert "error" not in r, r
    bf16 = "bf16" in name
    assert r["precision"] == ("bf16" if bf16 else "fp32")
    assert r["model_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert r["accum_dtype"] == "torch.float32", r
    # bf16 configs reduce gradients in bf16 (half the traffic; one rounding of the sum).
    assert r["comm_dtype"] == r["model_dtype"]
    stage = int(name[4])
    expect_opt = {1: "BF16_Optimizer" if bf16 else "DeepSpeedZeroOptimizer",
                  2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    assert r["optimizer"] == expect_opt
    # What the accumulation kept: the fp32 sum; bf16 ZeRO-1 (BF16_Optimizer) rounds the
    # accumulated fp32 gradient to bf16 once (within 2^-8 relative), never the 11% a bf16
    # accumulator loses here.
    master = r["master"]
    assert len(set(master)) == 1
    tol = 2.0 ** -8 if r["optimizer"] == "BF16_Optimizer" else 1e-6
    assert abs(-master[0] - FP32_SUM) <= tol * FP32_SUM, (name, master[0], FP32_SUM)


@pytest.mark.parametrize("name", ["zero2_bf16", "zero3_bf16"])
def test_bf16_accumulation_loses_the_small_gradients(engines, name):
    """The same config without `data_types.grad_accum_dtype` (DeepSpeed's default for bf16):
    63 of the 64 micro-batches' gradients vanish, a 11% error in this step's gradient."""
    r = engines[f"{name}:no_accum_dtype"]
    assert r["accum_dtype"] == "torch.bfloat16"
    assert -r["master"][0] == BF16_SUM
    assert abs(FP32_SUM - BF16_SUM) / FP32_SUM > 0.10


@pytest.mark.parametrize("name", [c for c in CONFIGS if "fp16" in c])
def test_fp16_configs_are_gpu_only_and_say_so(name):
    """fp16 configs accumulate in fp16 under the dynamic loss scale (DeepSpeed's default); no
    fp16 engine can be built on a CPU to show another choice works, so none is shipped. The
    file is read and the CPU refused before anything starts."""
    cfg = json.loads((DEEPSPEED_CONFIG_DIR / f"{name}.json").read_text())
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0   # dynamic loss scaling
    recipe = load_pretrain_recipe("tiny_ci", [f"train.deepspeed={json.dumps(name)}"])
    with pytest.raises(ConfigError, match="only on GPUs"):
        deepspeed_config(recipe, world_size=1, cuda=False)


def test_bf16_json_files_name_fp32_accumulation():
    for name in CONFIGS:
        cfg = json.loads((DEEPSPEED_CONFIG_DIR / f"{name}.json").read_text())
        if cfg.get("bf16", {}).get("enabled"):
            assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}, name


@pytest.mark.slow
def test_zero1_trains_like_zero2_in_bf16_under_accumulation(manifest, tmp_path):
    """The GPU recipes' ZeRO-1 (one gradient reduction per optimizer step instead of one per
    micro-batch) against ZeRO-2, both bf16 with fp32 accumulation, accumulation 4, through
    `bertscale pretrain`. Same start, so step 1 matches to bf16 precision; ZeRO-1's
    BF16_Optimizer rounds the accumulated gradient to bf16 once where ZeRO-2 keeps fp32, so
    later steps agree within a bf16-sized tolerance."""
    from pretrain_runs import pretrain, train_losses

    sets = ("train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=3",
            "schedule.warmup=1", "eval.every=0", "eval.at_start=false", "eval.samples=16",
            "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")
    losses = {}
    for stage in (1, 2):
        run = tmp_path / f"zero{stage}"
        out = pretrain(run, manifest, 1, *sets, f"train.deepspeed=\"zero{stage}_bf16\"")[0].stdout
        assert f"ZeRO-{stage} bf16, global batch 8 = 2 x 4 accumulation" in out
        losses[stage] = train_losses(run)
    assert sorted(losses[1]) == sorted(losses[2]) == [1, 2, 3]
    assert losses[1][1] == pytest.approx(losses[2][1], rel=1e-3)
    for step in (2, 3):
        assert losses[1][step] == pytest.approx(losses[2][step], rel=1e-2), step
    assert losses[1][3] != losses[1][1]          # it trained
