"""benchmarks/gpu_check.sh, the script prepared for a single GPU run, in its CPU dry-run mode
(tiny model, fp32, small batches): every step runs end to end and its results are real (the
real `bertscale pretrain` in each case, stopped, resumed and checked; both models of the step
table measured on the same weights and batch), the summary has a row per step, case and phase,
the results come back packed into a few small files (the GPU machine returns only what is under
$OUT: at most 8 files of 16 MiB, 2 folders deep), nothing is left outside the working folder and
the pack, a failed step makes the script exit 2 and name the step, a torch.compile that fell
back to eager is reported as a failure, the preflight names what is missing, the kit's wheels are
installed only where the interpreter lacks them, and a short deadline ends the run on time, its
running step killed with every process it started. Started from a directory other than the
repository, as on a GPU machine.

What the dry run cannot show: CUDA, NCCL (the 2-rank case runs on gloo), fp16 (its case runs
fp32 with `debug.overflow_at_steps` forcing the skipped updates) and bf16 (run as fp32)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from bertscale.config import preset

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = {"phase1": (128, 4), "phase2": (512, 2), "phase1_real_unpad": (128, 4),
          "phase2_real_unpad": (512, 2)}
CASES = ("pt_zero1_lamb", "pt_zero2_fp16", "pt_zero3", "pt_2rank_nccl")

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, str]:
    """The script in dry-run mode, started in tmp_path, with an empty TMPDIR of its own, packing
    into tmp_path/pack. DeepSpeed's CPU op comes from the environment's build cache unless the
    caller leaves GPU_CHECK_TORCH_EXTENSIONS_DIR empty (then the script's own scratch)."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    kit = tmp_path / "kit"
    kit.mkdir(exist_ok=True)
    before = set(tmp_path.iterdir())
    ext = os.environ.get("TORCH_EXTENSIONS_DIR",
                         str(Path.home() / ".cache" / "torch_extensions"))
    full_env = dict(os.environ, PRESET="tiny", DEVICE="cpu", DTYPE="fp32", BATCH1="4",
                    BATCH2="2", REPEATS="2", GPU_CHECK_OUT="out", GPU_CHECK_PACK="pack",
                    PEAK_N="512", PYTHON=sys.executable, TMPDIR=str(tmp), BATCH_PT="4",
                    STEPS_PT="4", GPU_CHECK_LIMIT_SCALE="4", GPU_CHECK_DEADLINE_S="2400",
                    GPU_CHECK_WHEELS=str(kit), GPU_CHECK_TORCH_EXTENSIONS_DIR=ext)
    full_env.update(env)
    if not full_env["GPU_CHECK_TORCH_EXTENSIONS_DIR"]:
        del full_env["GPU_CHECK_TORCH_EXTENSIONS_DIR"]
    p = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True,
                       text=True, timeout=2700)
    # GPU_CHECK_OUT=out is relative to where the script was started, and its scratch is gone.
    assert out.is_dir(), p.stdout + p.stderr
    assert set(tmp_path.iterdir()) == before | {out, tmp_path / "pack"}, p.stdout
    assert list(tmp.iterdir()) == []
    log = (out / "gpu_check.log").read_text()
    return p, out, log


def _check_pack(tmp_path: Path, out: Path, stdout: str) -> tarfile.TarFile:
    """What comes back from a GPU machine: three small files in the pack, the summary the same
    as the one printed, the full log, and the results without shards or checkpoints."""
    pack = tmp_path / "pack"
    assert sorted(f.name for f in pack.iterdir()) == [
        "gpu_check.log", "gpu_check_results.tar.gz", "gpu_check_summary.txt"]
    assert all(f.stat().st_size < 16 * 2**20 for f in pack.iterdir())
    assert (pack / "gpu_check.log").read_text() == (out / "gpu_check.log").read_text()
    summary = (pack / "gpu_check_summary.txt").read_text()
    assert summary.strip() and summary.strip() in stdout
    tar = tarfile.open(pack / "gpu_check_results.tar.gz")
    names = tar.getnames()
    assert "steps.tsv" in names
    assert not [n for n in names if "checkpoint" in n or n.endswith((".tar", ".bin", ".pt"))]
    return tar


def _check_pretrain_cases(out: Path, log: str) -> None:
    """Each case ran the real trainer twice (stopped at step 2, resumed to 4) and passed its
    checks; the numbers are the trainer's own."""
    for name in CASES:
        assert f"pretrain_case {name}: ok, resumed at step 2" in log, name
        r = json.loads((out / f"{name}.json").read_text())
        assert r["problems"] == [] and r["steps"] == 4 and r["resumed_at"] == 2
        assert r["seq_per_s"] > 0 and r["tflops"] > 0 and r["mfu_measured"] > 0
        assert r["mfu_datasheet"] is None          # no datasheet peak for a CPU
        assert r["peak_memory_gib"] > 0 and r["memory_kind"] == "cpu max rss"
        assert r["nproc"] == (2 if name == "pt_2rank_nccl" else 1)
        # The fp16 case's stand-in forces two skipped updates (steps 2 and 3 overflow once).
        assert r["skipped_updates"] == (2 if name == "pt_zero2_fp16" else 0), (name, r)
        metrics = (out / "pretrain" / f"run_{name}" / "metrics.jsonl").read_text()
        assert '"kind": "train", "step": 4' in metrics
        assert not (out / "pretrain" / f"run_{name}" / "checkpoints").exists()   # cleaned up
        assert r["log_every"] == 5 and r["timed_records"] == [1, 2, 3, 4]   # too short to warm
    assert "resumed from" in log and "--resume require" in log
    table = log.split("\n== summary", 1)[1].split("\nbertscale pretrain (DeepSpeed", 1)[1]
    table = table.split("\n\n", 1)[0]
    rows = [line.split() for line in table.splitlines()
            if line.split()[:1] and line.split()[0] in CASES]
    assert [row[0] for row in rows] == list(CASES), table
    # case, seq/s, TFLOP/s, MFU sheet, MFU measured, skips, peak GiB, resume
    assert all(row[3] == "n/a" and row[4].endswith("%") and row[7] == "ok" for row in rows), rows
    assert [row[5] for row in rows] == ["0", "2", "0", "0"]


def _steps(out: Path) -> dict[str, str]:
    """Each step's status in steps.tsv (ok, failed, timeout, skipped, deadline)."""
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return {row[0]: row[1] for row in rows}


def _summary(log: str) -> list[list[str]]:
    """The rows of the summary table that name an implementation: [run, impl, ...]."""
    table = log.split("\n== summary", 1)[1].splitlines()
    return [line.split() for line in table
            if line.split()[:1] and line.split()[0] in PHASES
            and line.split()[1] in ("bertscale", "transformers")]


@pytest.mark.slow
@pytest.mark.timeout(2700)   # ~8 pretrain invocations and 4 bench runs: minutes on a shared CPU
def test_dry_run_measures_both_models_in_every_phase(tmp_path):
    pytest.importorskip("transformers")
    p, out, log = _run(tmp_path, GPU_CHECK_2RANK="1", GPU_CHECK_SKIP="phase1_compile")
    assert p.returncode == 0, log + p.stderr
    assert re.search(r"preflight: have Python 3\.\d+\.\d+, torch .*tokenizers .*pytest", p.stdout)
    _check_pretrain_cases(out, log)
    assert log.rstrip().endswith("all steps that ran passed")
    assert "!!" not in log and "before the deadline" not in log
    # The GPU-marked tests are selected (the flash kernel's parity, the step without host
    # syncs): skipped on a CPU, passed with a GPU.
    assert re.search(r"== gpu_tests .*\n(.*\n)*?2 (skipped|passed), \d+ deselected", log), log
    assert re.search(r"matmul peak on cpu \(cpu\) fp32: \d+\.\d+ TFLOP/s", log)
    assert "== phase1_compile skipped" in log and "== microbatch skipped" in log
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["gpu_check.log", "steps.tsv", "pretrain", *(f"{name}.json" for name in (*PHASES, *CASES))])
    assert _steps(out) == {**{s: "ok" for s in ("preflight", "peak", "data", "gpu_tests",
                                                *CASES, *PHASES)},
                           "phase1_compile": "skipped"}
    tar = _check_pack(tmp_path, out, p.stdout)
    assert {f"{name}.json" for name in (*PHASES, *CASES)} <= set(tar.getnames())
    assert {f"pretrain/run_{name}/metrics.jsonl" for name in CASES} <= set(tar.getnames())
    assert "== wheels: none in" in log
    # An untrained model's loss: ln(vocab) for the masked tokens plus ln(2) for next sentence.
    untrained = math.log(preset("tiny").vocab_size) + math.log(2)
    for name, (seq_len, batch) in PHASES.items():
        r = json.loads((out / f"{name}.json").read_text())
        assert (r["preset"], r["seq_len"], r["batch"], r["dtype"]) == ("tiny", seq_len, batch,
                                                                       "fp32")
        assert r["repeats"] == 2 and r["optimizer"] == "adamw (fused)"
        real = name.endswith("_real_unpad")
        assert r["fast_paths"]["unpad"] is real
        assert (r["fill"] < 0.95) if real else (r["fill"] == 1.0), (name, r["fill"])
        res = r["results"]
        for impl in ("bertscale", "transformers"):
            assert res[impl]["seq_per_s"] > 0 and res[impl]["tokens_per_s"] > 0, (name, impl)
            assert len(res[impl]["times_s"]) == 2 and res[impl]["tflops"] > 0 < res[impl]["mfu"]
        assert res["speedup"] > 0
        # Same weights, same batch: the eval-mode losses agree, and they are an untrained
        # model's (so both sides really ran BERT on that batch).
        loss = r["initial_loss"]
        assert abs(loss["bertscale"] - loss["transformers"]) < 1e-4, (name, loss)
        assert abs(loss["bertscale"] - untrained) < 0.5, (name, loss)
    rows = _summary(log)
    assert [row[:2] for row in rows] == [[name, impl] for name in PHASES
                                         for impl in ("bertscale", "transformers")], rows
    assert all(float(row[2]) >= 0 and row[5].endswith("%") for row in rows)
    assert [row[-1].endswith("x") for row in rows] == [True, False] * 4   # speedup on ours
    assert "phase1_compile     no result" in log


def _wheel(folder: Path, name: str) -> Path:
    """A minimal real wheel (the zip pip installs: a module, METADATA, WHEEL, RECORD)."""
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return whl


def test_a_failed_step_exits_2_and_is_named_and_transformers_may_be_missing(tmp_path):
    """BATCH2=0 makes both seq-512 steps fail; a `transformers` that cannot be imported (as on a
    GPU machine without it) leaves the seq-128 ones measuring bertscale alone; a torch.compile
    backend that fails (tvm, not installed) makes bertscale run eager, and the check says so
    instead of reporting compiled numbers; without the data step the pretrain cases are
    reported missing. The kit holds a wheel this interpreter lacks (installed into the scratch)
    and one it has (kept: the kit only fills gaps)."""
    blocked = tmp_path / "no_transformers" / "transformers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('transformers blocked by the test')\n")
    kit = tmp_path / "kit"
    kit.mkdir()
    _wheel(kit, "bertscale_kit_probe")
    shutil.copy(_wheel(tmp_path, "pytest"), kit)    # pytest is installed: kept
    (tmp_path / "pytest-1.0-py3-none-any.whl").unlink()
    p, out, log = _run(tmp_path, BATCH1="2", BATCH2="0", REPEATS="1",
                       PYTHONPATH=str(blocked.parent), COMPILE_BACKEND="tvm",
                       GPU_CHECK_SKIP="data gpu_tests")
    assert p.returncode == 2, log + p.stderr
    assert "wheels: already installed here, kept: pytest-1.0-py3-none-any.whl" in log
    assert "wheels: installing bertscale_kit_probe-1.0-py3-none-any.whl" in log
    assert "preflight: optional, missing: transformers" in p.stdout
    for name in ("phase2", "phase2_real_unpad"):
        assert f"!! {name}: failed (exit 2)" in log
        assert not (out / f"{name}.json").exists()
    assert log.rstrip().endswith("steps that failed or timed out: pretrain phase2 "
                                 "phase2_real_unpad phase1_compile")
    assert "== data skipped (GPU_CHECK_SKIP)" in log and "!! pretrain cases: no shards" in log
    compiled = json.loads((out / "phase1_compile.json").read_text())
    assert compiled["fast_paths"]["compile"] is False and compiled["compile_backend"] == "tvm"
    assert "tvm" in compiled["compile_error"].split(":", 1)[1]   # the compiler's own error
    assert "!! phase1_compile: torch.compile failed and bertscale ran eager" in log
    assert "phase1_compile     torch.compile FAILED, bertscale ran eager: backend 'tvm'" in log
    assert "--batch, --repeats and --steps >= 1" in log
    for name in ("phase1", "phase1_real_unpad"):
        r = json.loads((out / f"{name}.json").read_text())
        assert set(r["results"]) == {"bertscale"} and r["results"]["bertscale"]["seq_per_s"] > 0
        assert set(r["initial_loss"]) == {"bertscale"} and r["transformers"] is None
    rows = _summary(log)
    assert [row[:2] for row in rows] == [["phase1", "bertscale"], ["phase1", "transformers"],
                                         ["phase1_real_unpad", "bertscale"],
                                         ["phase1_real_unpad", "transformers"]], rows
    assert "phase1             transformers  not measured: transformers is not installed" in log
    assert "phase2             no result" in log and ", no transformers," in log
    steps = _steps(out)
    assert (steps["phase2"], steps["phase1"], steps["pretrain"]) == ("failed", "ok", "failed")
    _check_pack(tmp_path, out, p.stdout)


@pytest.mark.slow
def test_a_short_deadline_ends_on_time_with_its_results_packed(tmp_path):
    """GPU_CHECK_DEADLINE_S=120 on this CPU, DeepSpeed's op built in the script's own scratch:
    the run ends by the deadline, what could not start is named, the step that was running
    when time ran out is killed with every process it started (none is left), and the pack
    holds what finished. Failed before the fix: the script had no deadline (its limits added up
    to 1,440 s) and a step cut by an outer timeout kept running."""
    import psutil

    t0 = time.monotonic()
    p, out, log = _run(tmp_path, GPU_CHECK_DEADLINE_S="120", GPU_CHECK_NEED_S="20",
                       GPU_CHECK_LIMIT_SCALE="1", GPU_CHECK_TORCH_EXTENSIONS_DIR="")
    took = time.monotonic() - t0
    print(f"gpu_check.sh with a 120 s deadline took {took:.1f} s")
    assert took < 125, (took, p.stdout)
    steps = _steps(out)
    late = [s for s, status in steps.items() if status in ("timeout", "deadline")]
    assert late, steps           # this CPU cannot do all of it in 120 s
    for name in late:
        assert (f"!! {name}: timed out" in log if steps[name] == "timeout"
                else f"== {name} skipped: " in log), name
    assert p.returncode == (2 if "timeout" in steps.values() else 0), p.stdout
    assert re.search(r"== summary \(t=\d+s of 120s\)", p.stdout)
    assert not list(out.glob("pretrain/run_*/checkpoints"))
    mine = [q for q in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(q.info["cmdline"] or [])]
    assert not mine, [q.info["cmdline"] for q in mine]
    _check_pack(tmp_path, out, p.stdout)


def test_preflight_names_what_is_missing(tmp_path):
    """A `tokenizers` that cannot be imported: the preflight names it and the check stops (exit
    1) before measuring anything; what is there is listed too."""
    blocked = tmp_path / "blocked" / "tokenizers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('tokenizers blocked by the test')\n")
    p, out, log = _run(tmp_path, PYTHONPATH=str(blocked.parent))
    assert p.returncode == 1, log + p.stderr
    assert ("preflight: MISSING: tokenizers (the data step and the trainer; "
            "ImportError: tokenizers blocked by the test)") in p.stdout
    assert re.search(r"preflight: have Python \S+, torch \S+, deepspeed", log)
    assert log.rstrip().endswith("preflight found missing pieces (above); nothing measured")
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.log", "steps.tsv"]
    # What comes back: the log (the summary needs the Python that failed the preflight).
    assert "preflight: MISSING: tokenizers" in (tmp_path / "pack" / "gpu_check.log").read_text()


QUALITY = REPO / "benchmarks" / "gpu_quality.sh"


def _quality(tmp_path: Path, data: Path, **env: str) -> subprocess.CompletedProcess:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    full_env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, TMPDIR=str(tmp),
                    GPU_QUALITY_DATA=str(data), GPU_QUALITY_OUT="out", GPU_QUALITY_PACK="pack",
                    GPU_CHECK_WHEELS=str(tmp_path / "no_kit"),
                    GPU_CHECK_TORCH_EXTENSIONS_DIR=os.environ.get(
                        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")))
    full_env.update(env)
    p = subprocess.run(["bash", str(QUALITY)], cwd=tmp_path, env=full_env, capture_output=True,
                       text=True, timeout=1500)
    assert list(tmp.iterdir()) == [], p.stdout   # the scratch (and its `bertscale` shim) is gone
    return p


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quality_stage_dry_run_at_toy_size(shared_data, tmp_path):
    """benchmarks/gpu_quality.sh on the CPU at toy size (one Wikipedia file, the tiny shape, a
    3-second budget per side, RTE with 64 examples, one seed): `bertscale bench quality` runs
    every stage through the `bertscale` command the script provides, and the table it reports
    comes back in the pack, with the stages' results and nothing large."""
    data = tmp_path / "data"
    (data / "wikipedia").mkdir(parents=True)
    (data / "vocab").mkdir()
    (data / "wikipedia" / "wiki_00.gz").symlink_to(shared_data / "wikipedia" / "wiki_00.gz")
    (data / "glue").symlink_to(shared_data / "glue")
    (data / "vocab" / "bert-base-uncased-vocab.txt").symlink_to(
        shared_data / "vocab" / "bert-base-uncased-vocab.txt")
    p = _quality(tmp_path, data, GPU_QUALITY_TASKS="RTE", GPU_QUALITY_SEEDS="1",
                 GPU_QUALITY_PRESET="tiny", GPU_QUALITY_BUDGET_MIN="0.05",
                 GPU_QUALITY_ARGS="--set train.global_batch_size=16 --set "
                                  "train.micro_batch_size=8 --calibrate-steps 3 --evals 2 "
                                  "--eval-samples 16 --epochs 1 --max-train-samples 64 "
                                  "--max-eval-samples 32 --threads 1")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "pretraining budget 0.05 min per side" in p.stdout
    pack = tmp_path / "pack"
    assert sorted(f.name for f in pack.iterdir()) == [
        "gpu_quality.log", "gpu_quality_results.tar.gz", "gpu_quality_summary.txt"]
    summary = (pack / "gpu_quality_summary.txt").read_text()
    assert summary.strip() in p.stdout and "| model | RTE (accuracy) | average |" in summary
    for label in ("(a) bertscale pretrained", "(b) random init", "(c) transformers pretrained"):
        assert f"| {label} |" in summary, label
    results = json.loads((tmp_path / "out" / "quality" / "results.json").read_text())
    assert results["settings"]["budget_min"] == 0.05 and results["tasks"] == ["RTE"]
    assert results["pretraining"]["bertscale"]["curve"][0]["step"] == 0
    names = tarfile.open(pack / "gpu_quality_results.tar.gz").getnames()
    assert {"quality.json", "quality/results.md", "quality/stages/pretrain_bertscale.json",
            "quality/pretrain/bertscale/metrics.jsonl", "steps.tsv"} <= set(names)
    assert not [n for n in names if n.split("/")[1:2] in (["models"], ["shards"])
                or "checkpoints" in n or n.endswith("vocab.txt")], names


def test_quality_stage_names_the_data_it_lacks(tmp_path):
    """Without `make gpu-data`'s folder the preflight stops the stage (exit 1) naming each
    missing piece and how to bring it."""
    p = _quality(tmp_path, tmp_path / "nothing_here")
    assert p.returncode == 1, p.stdout
    for piece in ("wikipedia", "vocab/bert-base-uncased-vocab.txt", "glue/CoLA/train.tsv",
                  "glue/STS-B/train.tsv"):
        assert re.search(rf"preflight: MISSING: \S*{re.escape(piece)} \(.*`make gpu-data`", p.stdout), piece
    assert "nothing measured" in p.stdout
    assert (tmp_path / "pack" / "gpu_quality.log").is_file()
