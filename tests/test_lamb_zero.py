"""LAMB under DeepSpeed ZeRO on 2 real ranks (gloo, CPU) against unsharded LAMB on 1 rank.

One 2-rank launch (tests/workers/lamb_zero_worker.py) trains the same tiny model from the same
weights on the same global batches under several DeepSpeed configurations; this process computes
the reference with a plain `Lamb` and no DeepSpeed. Under ZeRO each rank's optimizer sees flat
partitions that cut through parameter tensors (asserted below), so only a Lamb that sums its
norms per original tensor across ranks can match the reference; a naive one must not.

Tolerances: fp32 runs match the reference to ATOL = 1e-6 (the only difference is the order of
float sums: per-rank mean gradients averaged by DeepSpeed, norms summed from partial squares).
The bf16 run (forward and backward in bf16, fp32 master weights) gets BF16_ATOL = 2e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch import run_ranks
from workers.lamb_zero_worker import batches, build_model, loss_fn, make_lamb

ATOL = 1e-6
BF16_ATOL = 2e-2
REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "workers" / "lamb_zero_worker.py"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lamb_zero")
    run_ranks([str(WORKER), str(out)], world_size=2, timeout=300, cwd=REPO)
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """Plain LAMB, one process, the whole global batch per step."""
    model = build_model(0)
    opt = make_lamb(model)
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_partitions_cut_tensors(results):
    # Facts per rank and group: (tensors the rank holds only part of, tensors it holds any of).
    # Groups: weights (decayed), biases + LayerNorm, the one-element `gain`.
    # ZeRO-1/2 (fp32 and bf16): in both big groups each rank holds part of at least one tensor;
    # rank 1's share of the `gain` group is padding only. ZeRO-3 splits every tensor.
    rank0, rank1 = results["split_tensors"]
    for name in ("zero1_aware", "zero2_aware", "bf16_zero1_aware"):
        for facts in (rank0[name], rank1[name]):
            assert len(facts) == 3 and facts[0][0] >= 1 and facts[1][0] >= 1, (name, facts)
        assert rank0[name][2] == (0, 1) and rank1[name][2] == (0, 0), name
    assert rank0["zero3_aware"] == [(3, 3), (5, 5), (0, 1)]
    assert rank1["zero3_aware"] == [(3, 3), (5, 5), (0, 0)]
    assert rank0["zero0_aware"] == []          # no ZeRO: plain LAMB on the real tensors
    assert results["wrapper"]["zero2_aware"] == "DeepSpeedZeroOptimizer"
    assert results["wrapper"]["zero3_aware"] == "DeepSpeedZeroOptimizer_Stage3"
    assert results["wrapper"]["bf16_zero1_aware"] == "BF16_Optimizer"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero0_aware", "zero1_aware", "zero2_aware", "zero3_aware"])
def test_zero_aware_lamb_matches_unsharded(results, reference, name):
    diff = _max_diff(results["params"][name], reference)
    assert diff <= ATOL, f"{name}: max |param - reference| = {diff:.3g} > {ATOL}"


@pytest.mark.slow
def test_naive_lamb_under_zero_differs(results, reference):
    diff = _max_diff(results["params"]["zero2_naive"], reference)
    assert diff > 100 * ATOL, f"naive LAMB under ZeRO-2 matched the reference ({diff:.3g})"


@pytest.mark.slow
def test_bf16_zero1_lamb(results, reference):
    aware = _max_diff(results["params"]["bf16_zero1_aware"], reference)
    naive = _max_diff(results["params"]["bf16_zero1_naive"], reference)
    assert aware <= BF16_ATOL, f"bf16 ZeRO-1 aware LAMB differs by {aware:.3g}"
    assert naive > 5 * BF16_ATOL, f"bf16 ZeRO-1 naive LAMB differs by only {naive:.3g}"


@pytest.mark.slow
def test_checkpoint_restores_lamb_state_under_zero2(results):
    # The state loaded into a fresh engine equals the state at the save, bit for bit...
    assert results["ckpt_state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert results["ckpt_step"] == 3.0
    assert results["ckpt_state_maxdiff"] == 0.0
    # ...and training on from it gives exactly the uninterrupted run's parameters.
    assert _max_diff(results["params"]["zero2_resume"], results["params"]["zero2_aware"]) == 0.0


@pytest.mark.slow
def test_prenormalisation_refused_under_zero(results):
    msg = results["prenorm_error"]
    assert msg is not None and "max_grad_norm" in msg and "gradient_clipping" in msg
