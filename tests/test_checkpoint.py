"""Checkpoints: committed or ignored, pruned to the newest K, refused when the run changed, and
their weights recoverable on one CPU process from any ZeRO stage.

References: the runs of test_pretrain (real `bertscale pretrain` rank processes on Wikipedia
shards), DeepSpeed's own universal-checkpoint converter, and a plain PyTorch forward over the
held-out split compared with what the engine logged at the same step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bertscale.files import write_json_atomic
from bertscale.training.checkpoint import layout as ckpt_lib
from bertscale.training.checkpoint.consolidated import load_consolidated
from bertscale.training.checkpoint.marker import COMMIT_FILE
from bertscale.training.checkpoint.state import read_state
from bertscale.errors import UserError
from pretrain_runs import (WS1, manifest, plain_eval, prepare_wiki, records,  # noqa: F401
                           two_rank_env, ws1_runs, ws2_straight, zero_runs)

pytestmark = pytest.mark.slow


@pytest.fixture
def run_copy(ws1_runs, tmp_path) -> Path:
    """A writable copy of the world-size-1 run (committed steps 25 and 30)."""
    dst = tmp_path / "run"
    shutil.copytree(ws1_runs[0], dst)
    return dst


def _fake_later_copy(run: Path, src_step: int, step: int, commit: bool) -> Path:
    """Step `step` as a copy of `src_step`'s files: committed (marker naming it) or not."""
    src, dst = run / "checkpoints" / f"step_{src_step}", run / "checkpoints" / f"step_{step}"
    shutil.copytree(src, dst)
    (dst / COMMIT_FILE).unlink()
    if commit:
        write_json_atomic(dst / COMMIT_FILE, {"tag": dst.name, "step": step})
    return dst


def test_uncommitted_checkpoint_is_ignored_on_resume(run_copy, manifest):
    from bertscale import distributed
    from bertscale.config import load_pretrain_recipe
    from bertscale.pretraining.plan import build_plan

    torn = _fake_later_copy(run_copy, 30, 35, commit=False)  # e.g. killed during the save
    assert ckpt_lib.latest_committed(run_copy).step == 30
    with pytest.raises(UserError, match="never committed"):
        ckpt_lib.resolve(torn)
    assert ckpt_lib.resolve(run_copy).step == 30
    recipe = load_pretrain_recipe("tiny_ci", [f"data.manifest={json.dumps(str(manifest))}", *WS1])
    plan = build_plan(recipe, distributed.discover({}), run_copy, "require")
    assert plan.resume_from.step == 30
    assert plan.resume_from.component_state("data")["consumed_samples"] == 480
    # A marker that names another checkpoint is damage, not a commit.
    write_json_atomic(torn / COMMIT_FILE, {"tag": "step_30", "step": 30})
    with pytest.raises(UserError, match="does not name this checkpoint"):
        ckpt_lib.list_committed(run_copy)


def test_prune_keeps_the_newest_k_committed(run_copy):
    _fake_later_copy(run_copy, 30, 40, commit=True)
    _fake_later_copy(run_copy, 30, 45, commit=False)
    (run_copy / "checkpoints" / "step_25_universal").mkdir()
    ckpt_lib.prune(run_copy, keep=2, log=lambda m: None)
    assert [c.step for c in ckpt_lib.list_committed(run_copy)] == [30, 40]
    left = sorted(p.name for p in (run_copy / "checkpoints").iterdir() if p.is_dir())
    assert left == ["step_30", "step_40", "step_45"]  # uncommitted newer one untouched
    with pytest.raises(UserError, match="at least 2"):
        ckpt_lib.prune(run_copy, keep=1)


@pytest.mark.timeout(180)
def test_resume_with_other_tokenizer_data_or_shape_is_refused(run_copy, manifest, shared_data,
                                                              tmp_path, two_rank_env, capsys):
    from bertscale.cli import main

    cased = prepare_wiki(shared_data, tmp_path / "cased", vocab="bert-base-cased-vocab.txt")
    reshuffled = prepare_wiki(shared_data, tmp_path / "seed2", seed=2)

    def refused(run: Path, data: Path, *sets: str) -> str:
        args = ["pretrain", "tiny_ci", "--run-dir", str(run),
                "--set", f"data.manifest={json.dumps(str(data))}"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2
        return capsys.readouterr().err

    where = run_copy / "checkpoints" / "step_30"
    assert f"{where}: was trained with another tokenizer" in refused(run_copy, cased)
    assert f"{where}: was trained on another data manifest" in refused(run_copy, reshuffled)
    err = refused(run_copy, manifest, "model.num_hidden_layers=3", "model.intermediate_size=256")
    assert "model shape differs from the checkpoint (num_hidden_layers 2 -> 3; " \
           "intermediate_size 512 -> 256)" in err
    # Phase 2 from phase 1's weights: the tokenizer must match too (the data may differ).
    err = refused(tmp_path / "phase2", cased, f"train.init_from={json.dumps(str(run_copy))}")
    assert f"train.init_from {where}: was trained with another tokenizer" in err
    assert not (run_copy / "checkpoints" / "step_31").exists()


def test_checkpoint_contents(ws2_straight, manifest):
    from bertscale.data.shards import read_manifest

    latest = ckpt_lib.latest_committed(ws2_straight)
    state = read_state(latest)
    m = read_manifest(manifest)
    assert (latest.step, latest.marker["world_size"], latest.world_size) == (8, 2, 2)
    assert state.components["train"] == {"step": 8, "skipped_steps": 0}
    assert state.components["data"]["consumed_samples"] == 8 * 32
    assert state.run["tokenizer_hash"] == m.tokenizer_hash
    assert state.run["manifest_fingerprint"] == m.fingerprint
    assert state.run["model_config"]["num_hidden_layers"] == 2
    assert state.run["recipe"]["train"]["global_batch_size"] == 32
    rng = [torch.load(latest.path / f"rng_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank its own dropout stream
    assert not (latest.root / "latest").exists()  # DeepSpeed's pointer is not ours to trust


def test_load_consolidated_from_zero2_and_zero3(ws2_straight, zero_runs, manifest):
    from bertscale.model import BertForPreTraining

    final = load_consolidated(ws2_straight)  # the run folder: newest committed
    assert final.step == 8 and final.lowercase is True
    assert final.vocab_path == ws2_straight / "vocab.txt"
    model = BertForPreTraining(final.config)
    assert set(final.state_dict) == set(model.state_dict())
    model.load_state_dict(final.state_dict)
    # The consolidated weights give, in plain PyTorch, what the engine measured at step 8.
    logged = records(ws2_straight, "eval")[-1]
    assert logged["step"] == 8
    mine = plain_eval(model, manifest, micro=8, seed=1234, samples=128)
    for key in ("mlm_loss", "nsp_loss"):
        assert mine[key] == pytest.approx(logged[key], rel=1e-5), key
    for key in ("mlm_acc", "nsp_acc"):
        assert mine[key] == pytest.approx(logged[key], abs=2e-3), key

    # ZeRO-3 partitions the parameters themselves; merged they equal ZeRO-2's at the same step.
    z2 = load_consolidated(ws2_straight / "checkpoints" / "step_4")
    z3 = load_consolidated(zero_runs[3])
    assert z3.step == z2.step == 4
    assert set(z3.state_dict) == set(z2.state_dict)
    for k, v in z2.state_dict.items():
        torch.testing.assert_close(z3.state_dict[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert z3.state_dict["cls.predictions.decoder.weight"].data_ptr() != 0
    torch.testing.assert_close(z3.state_dict["cls.predictions.decoder.weight"],
                               z3.state_dict["bert.embeddings.word_embeddings.weight"])


def test_deepspeed_converts_it_to_a_universal_checkpoint(ws2_straight, tmp_path):
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    latest = ckpt_lib.latest_committed(ws2_straight)
    out = tmp_path / "universal"
    ds_to_universal(SimpleNamespace(input_folder=str(latest.path), output_folder=str(out),
                                    num_extract_workers=1, num_merge_workers=1,
                                    keep_temp_folder=False, strict=True, inject_missing_state=False))
    word = out / "zero" / "bert.embeddings.word_embeddings.weight"
    merged = torch.load(word / "fp32.pt", weights_only=False)["param"]
    z = load_consolidated(ws2_straight)
    torch.testing.assert_close(merged, z.state_dict["bert.embeddings.word_embeddings.weight"])
    assert (word / "exp_avg.pt").is_file() and (word / "exp_avg_sq.pt").is_file()
