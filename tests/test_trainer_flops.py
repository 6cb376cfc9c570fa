"""One FLOP count: the trainer's logged model FLOPs, TFLOP/s and MFU are bertscale.perf's count
for the real batch the step trained on (real tokens only, not the padded length), through
`bertscale pretrain` on real Wikipedia shards. The batches are re-read with the product's own
loader at the same position (what the command cannot show is which sequences a step used)."""

from __future__ import annotations

import pytest

from pretrain_runs import manifest, pretrain, records  # noqa: F401 - fixture

G, MICRO = 16, 8


def test_trainer_mfu_is_the_shared_count_on_real_tokens(manifest, tmp_path):
    """Logged at steps 1, 2 and 4 (logging.every=2): the record of step 4 covers steps 3 and 4,
    the steps since the previous read, since the trainer does not read its statistics back at
    step 3: its TFLOP/s is both steps' model FLOPs over their wall time, its `model_flops` step
    4's own."""
    from bertscale.training.checkpoint.layout import latest_committed
    from bertscale.training.checkpoint.state import read_state
    from bertscale.config import ModelConfig, from_dict
    from bertscale.data.loader import LoaderConfig, MaskingConfig, open_loader
    from bertscale.data.shards import read_manifest
    from bertscale.perf import step_flops

    run = tmp_path / "run"
    res = pretrain(run, manifest, 1, f"train.global_batch_size={G}", "train.steps=4",
                   "schedule.warmup=1", "eval.every=0", "eval.at_start=false", "eval.samples=16",
                   "logging.every=2", extra=("--peak-tflops", "0.25"))[0]
    assert "MFU against 0.25 TFLOP/s per device (logging.peak_tflops, fp32)" in res.stdout
    state = read_state(latest_committed(run))
    cfg = from_dict(ModelConfig, state.run["model_config"])
    loader = open_loader(read_manifest(manifest), LoaderConfig(
        split="train", global_batch_size=G, micro_batch_size=MICRO, rank=0, world_size=1,
        seed=1234, masking=MaskingConfig(), verify_sha256=False))
    batches = iter(loader)
    flops, padded_like = {}, 0
    for step in range(1, 5):
        micro = [next(batches) for _ in range(G // MICRO)]
        lengths = [int(n) for b in micro for n in b["attention_mask"].sum(dim=1)]
        predictions = sum(int((b["masked_labels"] != -100).sum()) for b in micro)
        flops[step] = step_flops(cfg, lengths, predictions).train
        # Real documents leave padding: counting the padded length would claim more work.
        seq_len = micro[0]["attention_mask"].shape[1]
        padded_like = step_flops(cfg, [seq_len] * len(lengths), predictions).train
        assert sum(lengths) < seq_len * len(lengths) and flops[step] < padded_like
    loader.close()
    train = records(run, "train")
    assert [(r["step"], r["window_steps"]) for r in train] == [(1, 1), (2, 1), (4, 2)]
    for r in train:
        window = range(r["step"] - r["window_steps"] + 1, r["step"] + 1)
        assert r["model_flops"] == flops[r["step"]], (r["step"], r["model_flops"])
        seconds = r["step_time_s"] * r["window_steps"]
        assert r["tflops"] == pytest.approx(sum(flops[s] for s in window) / seconds / 1e12,
                                            rel=1e-12)
        assert r["samples_per_s"] == pytest.approx(G * r["window_steps"] / seconds, rel=1e-12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.25, rel=1e-12)
    assert padded_like


def test_datasheet_peaks_are_named_and_matched_by_device_name():
    """The trainer's default MFU peak (no GPU here, so as a function): torch's device names."""
    from bertscale.perf import datasheet_peak, mfu_peak

    assert datasheet_peak("NVIDIA H200", "bf16") == (989.4, "NVIDIA H200 (SXM) datasheet")
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")[1] == "NVIDIA H100 SXM datasheet"
    assert datasheet_peak("NVIDIA H100 PCIe", "fp16") == (756.0, "NVIDIA H100 PCIe datasheet")
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "fp32") == (156.0, "NVIDIA A100 datasheet")
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bf16") is None
    assert mfu_peak(0.0, "cpu", "fp32") is None
    assert mfu_peak(312.0, "cpu", "bf16") == (312.0, "logging.peak_tflops")
