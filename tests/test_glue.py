"""GLUE: the nine tasks' real TSV files (fixtures in the official layout for SST-2, QQP and
MNLI, which are not in the shared data), bad-input errors, the submission files, and a real
fine-tuning run of real pretrained weights on real STS-B."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from bertscale.devices import resolve_device, resolve_precision
from bertscale.errors import UserError
from bertscale.finetune import glue
from bertscale.finetune.models import (build_model, check_casing, load_checkpoint,
                                       load_task_tokenizer, unk_fraction)
from bertscale.finetune.runtime import start
from finetune_helpers import finetune_cli, tiny_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "finetune"

# (task, file, examples) as the shared data README and the GLUE paper list them.
REAL_FILES = [
    ("CoLA", "train.tsv", 8551), ("CoLA", "dev.tsv", 1043), ("CoLA", "test.tsv", 1063),
    ("MRPC", "train.tsv", 3668), ("MRPC", "dev.tsv", 408), ("MRPC", "test.tsv", 1725),
    ("RTE", "train.tsv", 2490), ("RTE", "dev.tsv", 277), ("RTE", "test.tsv", 3000),
    ("STS-B", "train.tsv", 5749), ("STS-B", "dev.tsv", 1500), ("STS-B", "test.tsv", 1379),
    ("QNLI", "dev.tsv", 5463), ("QNLI", "test.tsv", 5463),
    ("WNLI", "dev.tsv", 71), ("WNLI", "test.tsv", 146),
]


def _read(folder: Path, task_name: str, fname: str) -> list[glue.Example]:
    task = glue.TASKS[task_name]
    labelled = not fname.startswith("test")
    return glue.read_tsv(folder / task_name / fname, task,
                         task.train if labelled else task.test, labelled)


@pytest.mark.parametrize("task_name,fname,count", REAL_FILES)
def test_reads_the_real_glue_files(shared_data: Path, task_name: str, fname: str, count: int) -> None:
    examples = _read(shared_data / "glue", task_name, fname)
    assert len(examples) == count
    assert all(e.text_a for e in examples)
    if glue.TASKS[task_name].train.text_b is not None:
        assert all(e.text_b for e in examples)
    if fname.startswith("test"):
        assert [e.guid for e in examples] == [str(i) for i in range(count)]


def test_real_labels_and_text_are_read_from_the_right_columns(shared_data: Path) -> None:
    g = shared_data / "glue"
    mrpc = _read(g, "MRPC", "dev.tsv")   # starts with a byte-order mark; quotes are text
    assert [sum(e.label == k for e in mrpc) for k in (0, 1)] == [129, 279]
    assert mrpc[0].text_b.startswith('"The foodservice pie business')
    cola = _read(g, "CoLA", "dev.tsv")
    assert [sum(e.label == k for e in cola) for k in (0, 1)] == [322, 721]
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    rte = _read(g, "RTE", "dev.tsv")
    assert sum(e.label == glue.TASKS["RTE"].labels.index("entailment") for e in rte) == 146
    stsb = _read(g, "STS-B", "dev.tsv")
    assert stsb[0].label == 5.0 and stsb[1].label == 4.75
    assert _read(g, "WNLI", "dev.tsv")[0].text_b == "The hair has to be cleaned."


def test_reads_the_fixture_layouts_of_the_missing_tasks() -> None:
    mnli = {f: _read(FIXTURES, "MNLI", f) for f in ("train.tsv", "dev_matched.tsv",
                                                       "dev_mismatched.tsv", "test_matched.tsv")}
    assert [len(v) for v in mnli.values()] == [12, 6, 6, 3]
    assert {e.label for e in mnli["train.tsv"]} == {0, 1, 2}
    assert mnli["dev_matched.tsv"][1].text_b == "The museum is open every day of the week."
    qqp = _read(FIXTURES, "QQP", "dev.tsv")
    assert qqp[0].text_a == "How do I make fresh pasta at home?" and qqp[0].label == 1
    assert _read(FIXTURES, "SST-2", "train.tsv")[1].label == 0


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bad_input_names_file_line_and_problem(tmp_path: Path, shared_data: Path) -> None:
    g = shared_data / "glue"
    # RTE's file given as MRPC: the columns are wrong.
    with pytest.raises(UserError, match=r"RTE/train\.tsv:1: header has no column '#1 String'"):
        glue.read_tsv(g / "RTE" / "train.tsv", glue.TASKS["MRPC"], glue.TASKS["MRPC"].train, True)
    lines = (g / "RTE" / "dev.tsv").read_text().split("\n")
    lines[5] = lines[5].replace("\t", " ", 1)            # line 6 loses a field
    short = _write(tmp_path / "short" / "dev.tsv", "\n".join(lines))
    with pytest.raises(UserError, match=r"short/dev\.tsv:6: 3 tab-separated fields, but the header has 4"):
        glue.read_tsv(short, glue.TASKS["RTE"], glue.TASKS["RTE"].train, True)
    lines = (g / "RTE" / "dev.tsv").read_text().split("\n")
    lines[9] = lines[9].rsplit("\t", 1)[0] + "\tmaybe"
    odd = _write(tmp_path / "odd" / "dev.tsv", "\n".join(lines))
    with pytest.raises(UserError, match=r"odd/dev\.tsv:10: label 'maybe' is not a RTE label "
                                        r"\(expected one of entailment, not_entailment\)"):
        glue.read_tsv(odd, glue.TASKS["RTE"], glue.TASKS["RTE"].train, True)
    lines = (g / "STS-B" / "dev.tsv").read_text().split("\n")
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t7.5"
    sts = _write(tmp_path / "sts" / "dev.tsv", "\n".join(lines))
    with pytest.raises(UserError, match=r"sts/dev\.tsv:4: score '7\.5' is not a number in \[0, 5\]"):
        glue.read_tsv(sts, glue.TASKS["STS-B"], glue.TASKS["STS-B"].train, True)
    # CoLA's headerless rows must have its 4 fields; a headered file shows up as a bad label.
    cola = _write(tmp_path / "cola" / "train.tsv", "gj04\t1\t\tFine.\ngj04\t1\tOnly three.\n")
    with pytest.raises(UserError, match=r"cola/train\.tsv:2: 3 tab-separated fields, but CoLA rows have 4"):
        glue.read_tsv(cola, glue.TASKS["CoLA"], glue.TASKS["CoLA"].train, True)
    headered = _write(tmp_path / "cola2" / "train.tsv", "source\tlabel\tmark\tsentence\n")
    with pytest.raises(UserError, match=r"cola2/train\.tsv:1: label 'label' is not a CoLA label"):
        glue.read_tsv(headered, glue.TASKS["CoLA"], glue.TASKS["CoLA"].train, True)
    with pytest.raises(UserError, match="unknown GLUE task 'MRPCX'"):
        glue.task_by_name("MRPCX")


def _glue_tree(root: Path, shared_data: Path) -> Path:
    """All nine tasks in the GLUE download layout: the real files where the shared data has
    them (QNLI and WNLI have no train.tsv there: their dev set stands in), fixtures for the rest."""
    for task in ("CoLA", "MRPC", "RTE", "STS-B", "QNLI", "WNLI"):
        shutil.copytree(shared_data / "glue" / task, root / task)
    for task in ("QNLI", "WNLI"):
        shutil.copyfile(root / task / "dev.tsv", root / task / "train.tsv")
    for task in ("SST-2", "QQP", "MNLI"):
        shutil.copytree(FIXTURES / task, root / task)
    return root


def _table(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().rstrip("\n").split("\n")]


def test_all_nine_tasks_end_to_end_with_submission_files(tmp_path: Path, shared_data: Path,
                                                         minilm_dir: Path) -> None:
    """`bertscale finetune glue --task all` over the nine tasks with two seeds: every task gets
    its results, its dev predictions (whose official metric is the reported one) and its test
    predictions in the GLUE server's format."""
    data = _glue_tree(tmp_path / "glue", shared_data)
    ckpt = tiny_hf_checkpoint(tmp_path / "ckpt", minilm_dir / "vocab.txt")
    out = tmp_path / "out"
    rc = finetune_cli(["finetune", "glue", "--task", "all", "--data-dir", str(data),
               "--checkpoint", str(ckpt), "--output-dir", str(out), "--lr", "1e-4",
               "--seeds", "1,2", "--max-steps", "2", "--batch-size", "8",
               "--max-train-samples", "16", "--max-eval-samples", "40", "--eval-batch-size", "256",
               "--log-every", "0"])
    assert rc == 0
    submissions = {"CoLA": ["CoLA.tsv"], "SST-2": ["SST-2.tsv"], "MRPC": ["MRPC.tsv"],
                   "STS-B": ["STS-B.tsv"], "QQP": ["QQP.tsv"], "QNLI": ["QNLI.tsv"],
                   "RTE": ["RTE.tsv"], "WNLI": ["WNLI.tsv"],
                   "MNLI": ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]}
    for name, files in submissions.items():
        task = glue.TASKS[name]
        results = json.loads((out / name / "results.json").read_text())
        assert results["predictions"] == files
        assert len(results["runs"]) == 2
        for metric, stat in results["metrics"].items():   # mean ± sample std over the seeds
            values = [r["metrics"][metric] for r in results["runs"]]
            assert stat["mean"] == pytest.approx(statistics.fmean(values))
            assert stat["std"] == pytest.approx(statistics.stdev(values))
        test_files = [f for f, _ in task.test_files] + (["AX.tsv"] if name == "MNLI" else [])
        for sub, test_file in zip(files, test_files):
            rows = _table(out / name / sub)
            layout = glue.AX_LAYOUT if sub == "AX.tsv" else task.test
            test = glue.read_tsv(data / name / test_file, task, layout, labelled=False)
            assert rows[0] == ["index", "prediction"]
            assert [r[0] for r in rows[1:]] == [e.guid for e in test]
            if task.labels is None:
                assert all(np.isfinite(float(r[1])) and len(r[1].split(".")[1]) == 3
                           for r in rows[1:])
            else:
                assert {r[1] for r in rows[1:]} <= set(task.labels)
        # Each run's dev predictions give back its reported metric through sklearn / scipy.
        for run in results["runs"]:
            folder = out / name / "runs" / run["folder"]
            for dev_file, suffix in task.dev_files:
                rows = _table(folder / dev_file.replace(".tsv", "_predictions.tsv"))[1:]
                if task.labels is None:
                    p, y = (np.array([float(r[i]) for r in rows]) for i in (1, 2))
                    assert run["metrics"]["spearman"] == pytest.approx(
                        scipy.stats.spearmanr(p, y)[0], abs=1e-9)
                    assert run["metrics"]["pearson"] == pytest.approx(
                        scipy.stats.pearsonr(p, y)[0], abs=1e-9)
                    continue
                p, y = ([task.labels.index(r[i]) for r in rows] for i in (1, 2))
                if name == "CoLA":
                    assert run["metrics"]["mcc"] == pytest.approx(sklearn.metrics.matthews_corrcoef(y, p))
                else:
                    assert run["metrics"]["accuracy" + suffix] == pytest.approx(
                        sklearn.metrics.accuracy_score(y, p))
                if task.main_metric == "f1_accuracy":
                    assert run["metrics"]["f1"] == pytest.approx(sklearn.metrics.f1_score(y, p))
        # The published files are the chosen run's (best mean lr, then its best seed).
        best = out / name / "runs" / f"lr{results['best_lr']:g}-seed{results['best_seed']}"
        assert (best / files[0]).read_bytes() == (out / name / files[0]).read_bytes()


def test_casing_mismatch_is_warned(tmp_path: Path, shared_data: Path, minilm_dir: Path) -> None:
    """An uncased vocabulary read case-sensitively turns capitalised words into [UNK]."""
    cased_reading = load_checkpoint(tiny_hf_checkpoint(
        tmp_path / "c", minilm_dir / "vocab.txt", lowercase=False))
    texts = [e.text_a for e in _read(shared_data / "glue", "STS-B", "dev.tsv")[:300]]
    tok = load_task_tokenizer(cased_reading, 128)
    rate = unk_fraction(tok, (enc.ids for enc in tok.encode_batch(texts)))
    assert rate > 0.05
    with pytest.warns(UserWarning) as caught:
        check_casing(cased_reading, rate, "STS-B dev")
    messages = " | ".join(str(w.message) for w in caught)
    assert "lowercase=False but its vocabulary looks uncased" in messages
    assert "% of word pieces are [UNK]" in messages
    right = load_checkpoint(minilm_dir)       # the same vocab, lower-cased: no warning
    tok = load_task_tokenizer(right, 128)
    rate = unk_fraction(tok, (enc.ids for enc in tok.encode_batch(texts)))
    assert rate < 0.01
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_casing(right, rate, "STS-B dev")
    # The text itself: real MRPC news sentences are cased (names, places: 14% of later words
    # capitalised), which an uncased checkpoint lower-cases away; STS-B's image captions are
    # not (under 5%); text lower-cased, given a cased reading, is the reverse mismatch.
    news = [e.text_a for e in _read(shared_data / "glue", "MRPC", "dev.tsv")[:300]]
    with pytest.warns(UserWarning, match=r"MRPC dev is cased \(\d+% of words .* is uncased"):
        check_casing(right, rate, "MRPC dev", news)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_casing(right, rate, "STS-B dev", texts)
    with pytest.warns(UserWarning, match=r"STS-B dev is all lower-case but .* is cased"):
        check_casing(cased_reading, 0.0, "STS-B dev", [t.lower() for t in texts])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_casing(right, rate, "STS-B dev", [t.lower() for t in texts])


def test_real_weights_learn_sts_b(tmp_path: Path, shared_data: Path, minilm_dir: Path) -> None:
    """all-MiniLM-L6-v2's real weights fine-tuned on 800 real STS-B training pairs (one epoch,
    batch 8, lr 5e-5, 100 steps, 50-75 s on one CPU thread) and scored on the first 400 dev pairs.

    Chance is Spearman 0 (the standard error of a null Spearman over 400 pairs is
    1/sqrt(399) = 0.05). Measured here: Spearman 0.48-0.51 / 0.65 / 0.61 and Pearson
    0.59-0.61 / 0.70 / 0.64 for seeds 1 / 2 / 3. The threshold 0.35 sits 7 null standard errors
    above chance and 0.13 below the worst run, so it fails for a model that did not learn (or for
    a broken metric, loader or schedule) and not for seed noise. (The full recipe on a GPU, 3
    epochs of all 5,749 pairs, reached Spearman 0.855 on the whole dev set.)"""
    t0 = time.perf_counter()
    assert finetune_cli(["finetune", "glue", "--task", "STS-B", "--data-dir",
                         str(shared_data / "glue"), "--checkpoint", str(minilm_dir),
                         "--output-dir", str(tmp_path), "--lr", "5e-5", "--seeds", "1",
                         "--epochs", "1", "--batch-size", "8", "--log-every", "0",
                         "--max-train-samples", "800", "--max-eval-samples", "400",
                         "--no-test"]) == 0
    summary = json.loads((tmp_path / "STS-B" / "results.json").read_text())
    m = summary["metrics"]
    print(f"STS-B from real MiniLM weights: spearman {m['spearman']['mean']:.3f} pearson "
          f"{m['pearson']['mean']:.3f} in {time.perf_counter() - t0:.0f} s")
    assert m["spearman"]["mean"] > 0.35
    assert m["pearson"]["mean"] > 0.35


def _bertscale(args: list[str], cwd: Path) -> None:
    """Run `python -m bertscale.cli ...` as its own process (pretraining starts a process
    group, which must not live on in the test process)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "bertscale.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bertscale {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_every_entrypoint_from_a_bertscale_pretraining_run(tmp_path: Path, shared_data: Path) -> None:
    """prepare -> pretrain (2 DeepSpeed ZeRO-2 steps of the tiny CI recipe) -> fine-tune GLUE,
    SQuAD v1.1, SQuAD v2.0 and SWAG straight from the run folder. Reference: the same weights
    exported to a Hugging Face folder by `bertscale export` and fine-tuned with the same seeds
    give identical metrics and byte-identical prediction files, so the run-folder loader (any
    ZeRO stage, consolidated on load) builds exactly the model the exported weights describe."""
    corpus = tmp_path / "corpus.txt"    # ~2,000 lines of real Wikipedia prose (WikiText-2)
    corpus.write_text((shared_data / "wikitext-2-raw" / "wiki.valid.raw")
                      .read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    _bertscale(["prepare", str(corpus), "--out", str(tmp_path / "shards"), "--vocab",
                str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"), "--progress", "none"],
               tmp_path)
    run = tmp_path / "run"
    _bertscale(["pretrain", "tiny_ci", "--run-dir", str(run),
                "--set", f"data.manifest={tmp_path / 'shards' / 'seq128' / 'manifest.json'}",
                "--set", "train.steps=2", "--set", "schedule.warmup=1",
                "--set", "checkpoint.every=2", "--set", "eval.every=2",
                "--set", "eval.samples=8", "--set", "eval.at_start=false"], tmp_path)
    exported = tmp_path / "hf"
    _bertscale(["export", "--from", str(run), "--to", str(exported)], tmp_path)

    # The fine-tuning model's encoder is exactly the run's consolidated weights.
    import torch

    from bertscale.training.checkpoint.consolidated import load_consolidated
    from bertscale.model import BertForSequenceClassification
    consolidated = load_consolidated(run).state_dict
    model = build_model(BertForSequenceClassification, load_checkpoint(run), start("cpu"),
                        num_labels=2)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("bert.")}
    assert len(encoder) > 30
    assert all(torch.equal(v, consolidated[k]) for k, v in encoder.items())
    # The one-call loader gives the same model from the run folder (pretraining heads included).
    import bertscale
    loaded = bertscale.from_pretrained(run)
    assert type(loaded).__name__ == "BertForPreTraining" and not loaded.training
    assert all(torch.equal(v, consolidated[k]) for k, v in loaded.state_dict().items())
    squad_dir = FIXTURES / "squad"
    dev11 = shared_data / "squad" / "v1.1" / "dev-v1.1.json"
    jobs = {
        "MRPC": (["glue", "--task", "MRPC", "--data-dir", str(shared_data / "glue"),
                  "--max-train-samples", "32", "--max-eval-samples", "64", "--no-test"],
                 ["dev_predictions.tsv"]),
        "SQuAD-v1.1": (["squad", "--version", "1.1", "--train-file", str(dev11),
                        "--predict-file", str(dev11), "--max-train-samples", "24",
                        "--max-eval-samples", "24"], ["predictions.json"]),
        "SQuAD-v2.0": (["squad", "--version", "2.0", "--train-file",
                        str(squad_dir / "train-v2.0.json"), "--predict-file",
                        str(squad_dir / "dev-v2.0.json")], ["predictions.json", "null_odds.json"]),
        "SWAG": (["swag", "--data-dir", str(FIXTURES / "swag")], ["predictions.csv",
                                                                  "val_predictions.csv"]),
    }
    for task, (argv, files) in jobs.items():
        results = []
        for source, out in ((run, tmp_path / "from_run"), (exported, tmp_path / "from_hf")):
            assert finetune_cli(["finetune", *argv, "--checkpoint", str(source), "--output-dir", str(out),
                         "--lr", "1e-3", "--seeds", "3", "--max-steps", "3", "--batch-size", "8",
                         "--log-every", "0"]) == 0
            results.append(json.loads((out / task / "results.json").read_text()))
        from_run, from_hf = results
        assert from_run["checkpoint_kind"] == "bertscale" and from_hf["checkpoint_kind"] == "huggingface"
        assert from_run["lowercase"] is True
        assert from_run["runs"][0]["metrics"] == from_hf["runs"][0]["metrics"]
        assert from_run["runs"][0]["train_loss_last20_mean"] == from_hf["runs"][0]["train_loss_last20_mean"]
        for name in files:
            a = tmp_path / "from_run" / task / "runs" / "lr0.001-seed3" / name
            b = tmp_path / "from_hf" / task / "runs" / "lr0.001-seed3" / name
            assert a.read_bytes() == b.read_bytes(), name
        # Both name the same weights: the run's step-2 checkpoint, the HF copy of it.
        assert from_run["checkpoint_step"] == 2 and from_hf["checkpoint_step"] is None
        assert from_run["checkpoint"] == str(run / "checkpoints" / "step_2")
        assert from_run["checkpoint_fingerprint"] == from_hf["checkpoint_fingerprint"]

    # A grid never mixes pretrained checkpoints. Pretraining goes on to step 4 (a new newest
    # committed checkpoint), then the MRPC grid from the run folder is asked for another seed:
    # refused in one line naming both checkpoints. Given the step-2 checkpoint itself, it
    # continues, and every run of the grid records step 2 and the same fingerprint.
    # Failed before the fix: the grid took seed 4 from step 4 and averaged it with seed 3 from
    # step 2, recording only the path "run" for both.
    _bertscale(["pretrain", "tiny_ci", "--run-dir", str(run),
                "--set", f"data.manifest={tmp_path / 'shards' / 'seq128' / 'manifest.json'}",
                "--set", "train.steps=4", "--set", "schedule.warmup=1",
                "--set", "checkpoint.every=2", "--set", "eval.every=2",
                "--set", "eval.samples=8", "--set", "eval.at_start=false"], tmp_path)
    mrpc = [*jobs["MRPC"][0], "--output-dir", str(tmp_path / "from_run"), "--lr", "1e-3",
            "--seeds", "3,4", "--max-steps", "3", "--batch-size", "8", "--log-every", "0"]
    with pytest.raises(UserError) as refused:
        finetune_cli(["finetune", *mrpc, "--checkpoint", str(run)])
    message = str(refused.value)
    assert "\n" not in message and "never averaged" in message, message
    assert f"{run / 'checkpoints' / 'step_2'} (step 2, weights " in message, message
    assert f"{run / 'checkpoints' / 'step_4'} (step 4, weights " in message, message
    assert finetune_cli(["finetune", *mrpc, "--checkpoint", str(run / "checkpoints" / "step_2")]) == 0
    grid = json.loads((tmp_path / "from_run" / "MRPC" / "results.json").read_text())
    assert grid["checkpoint_step"] == 2 and len(grid["runs"]) == 2
    for seed in (3, 4):
        one = json.loads((tmp_path / "from_run" / "MRPC" / "runs" / f"lr0.001-seed{seed}" /
                          "results.json").read_text())
        assert (one["checkpoint_step"], one["checkpoint_fingerprint"]) == (
            2, grid["checkpoint_fingerprint"])


def test_bad_flags_are_refused_before_training(tmp_path: Path, minilm_dir: Path) -> None:
    base = ["finetune", "glue", "--task", "SST-2", "--data-dir", str(FIXTURES),
            "--checkpoint", str(minilm_dir), "--output-dir", str(tmp_path)]
    with pytest.raises(UserError, match="--lr 0: learning rates must be positive"):
        finetune_cli(base + ["--lr", "0"])
    with pytest.raises(UserError, match=r"--seeds '1,x': expected a comma-separated list of ints"):
        finetune_cli(base + ["--seeds", "1,x"])
    with pytest.raises(UserError, match=r"--warmup is a fraction in \[0, 1\), got 10"):
        finetune_cli(base + ["--warmup", "10"])
    with pytest.raises(UserError, match="--max-seq-length 1024 exceeds the 512 positions of"):
        finetune_cli(base + ["--max-seq-length", "1024"])
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", resolve_device("cpu"))
    assert not (tmp_path / "SST-2").exists()          # nothing half-written
