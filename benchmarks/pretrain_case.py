"""One case of benchmarks/gpu_check.sh: the real `bertscale pretrain` for a few dozen steps,
stopped halfway (a committed checkpoint), resumed to the end, then checked and summarised.

    python benchmarks/pretrain_case.py --name zero1_bf16_lamb --manifest M --out DIR \
        --steps 40 --log-every 5 --set train.deepspeed="zero1_bf16" ... [--nproc 2]

Checks (exit 1 with the reason when one fails): both invocations exit 0; the second one resumed
from the halfway checkpoint; every step the logging cadence names (every --log-every steps, the
first and last of each invocation) was logged once; the losses are finite; the first loss after
the resume continues the curve (within --resume-rtol of the last loss before it; bitwise equality
is not expected on GPUs, whose kernels are not deterministic); the data position after the resume
counts every consumed sample, skipped updates included.
Writes DIR/NAME.json: seq/s and TFLOP/s (medians over the logged windows that leave out the first
--warmup steps of each invocation: the trainer reads its statistics back only at its log steps,
so each record's throughput is that of the steps since the previous read, `window_steps`), MFU
against the trainer's datasheet peak and against --peak-tflops (a measured matmul peak), skipped
updates, peak memory, and the resume check's numbers. The run's checkpoints are deleted at the end
(BERT-Large: ~4.7 GB each) unless --keep-checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


def _pretrain(args: argparse.Namespace, run: Path, extra: list[str]) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    argv = [*launch, "-m", "bertscale", "pretrain", args.recipe, "--run-dir", str(run),
            "--set", f"data.manifest={json.dumps(str(args.manifest))}",
            "--set", f"train.steps={args.steps}", "--set", f"logging.every={args.log_every}",
            "--set", "checkpoint.every=0", "--set", "checkpoint.at_end=false", *extra]
    for s in args.sets:
        argv += ["--set", s]
    print("+ " + " ".join(argv[1:]), flush=True)
    p = subprocess.run(argv, text=True, capture_output=True)
    sys.stdout.write(p.stdout[-4000:])
    sys.stderr.write(p.stderr[-4000:])
    return p


def _failed(args: argparse.Namespace, half: int, why: str) -> dict:
    return {"name": args.name, "steps": args.steps, "resumed_at": half, "nproc": args.nproc,
            "seq_per_s": None, "tokens_per_s": None, "tflops": None, "mfu_datasheet": None,
            "mfu_measured": None, "skipped_updates": 0, "loss_scales": [],
            "peak_memory_gib": None, "memory_kind": None, "loss_first": None, "loss_last": None,
            "resume_drift": None, "problems": [why], "log_every": args.log_every,
            "timed_records": []}


def _run_and_check(args: argparse.Namespace, run: Path) -> dict:
    half = args.steps // 2
    for attempt, extra in ((1, ["--resume", "never", "--stop-at-step", str(half)]),
                           (2, ["--resume", "require"])):
        p = _pretrain(args, run, extra)
        if p.returncode:
            return _failed(args, half, f"invocation {attempt} exited {p.returncode}")
        if attempt == 2 and f"(step {half}," not in p.stdout:
            return _failed(args, half, f"the second invocation did not resume from step {half}")

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    skips = [r for r in lines if r["kind"] == "skip"]
    steps = [r["step"] for r in train]
    problems = []
    expected = sorted({1, half, half + 1, args.steps,
                       *range(args.log_every, args.steps + 1, args.log_every)})
    if steps != expected:
        problems.append(f"logged steps {steps}, expected {expected}")
    if not all(math.isfinite(r["loss"]) for r in train):
        problems.append("a loss is not finite")
    by_step = {r["step"]: r for r in train}
    before, after = by_step.get(half), by_step.get(half + 1)
    drift = None
    if before and after:
        drift = abs(after["loss"] - before["loss"]) / before["loss"]
        if drift > args.resume_rtol:
            problems.append(f"loss {before['loss']:.4f} at step {half}, {after['loss']:.4f} after "
                            f"the resume: {drift:.1%} apart (limit {args.resume_rtol:.0%})")
        g = json.loads((run / "recipe.json").read_text())["train"]["global_batch_size"]
        if after["consumed_samples"] != (half + 1 + after["skipped_steps"]) * g:
            problems.append(f"consumed_samples {after['consumed_samples']} after the resume, "
                            f"expected {(half + 1 + after['skipped_steps']) * g}")
    # A record's throughput covers its window (the steps since the previous read): keep the
    # windows that start after the first --warmup steps of their invocation.
    timed = [r for r in train
             if r["step"] - r.get("window_steps", 1) >= (0 if r["step"] <= half else half)
             + args.warmup] or train

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    tflops = median("tflops")
    memory = [r.get("max_memory_gib", r.get("max_rss_gib")) for r in train]
    result = {
        "name": args.name, "steps": args.steps, "resumed_at": half, "nproc": args.nproc,
        "seq_per_s": median("samples_per_s"), "tokens_per_s": median("tokens_per_s"),
        "tflops": tflops, "mfu_datasheet": median("mfu"),
        "mfu_measured": (tflops / (args.peak_tflops * args.nproc)
                         if tflops and args.peak_tflops else None),
        "skipped_updates": len(skips), "loss_scales": [r.get("loss_scale") for r in skips],
        "peak_memory_gib": max((m for m in memory if m is not None), default=None),
        "memory_kind": "cuda max allocated" if "max_memory_gib" in train[-1] else "cpu max rss",
        "loss_first": train[0]["loss"] if train else None,
        "loss_last": train[-1]["loss"] if train else None,
        "resume_drift": drift, "problems": problems, "log_every": args.log_every,
        "timed_records": [r["step"] for r in timed],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--recipe", default="bert_large_phase1")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5,
                    help="logging.every: the trainer reads its statistics back at these steps")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="measured matmul peak")
    ap.add_argument("--resume-rtol", type=float, default=0.15)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--keep-checkpoints", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be at least 4")
    run = args.out / "pretrain" / f"run_{args.name}"
    try:
        result = _run_and_check(args, run)
    finally:
        if not args.keep_checkpoints:
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
    problems = result["problems"]
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out / f"{args.name}.json")
    if problems:
        print(f"pretrain_case {args.name}: " + "; ".join(problems))
        return 1
    print(f"pretrain_case {args.name}: ok, resumed at step {result['resumed_at']}, loss "
          f"{result['loss_first']:.3f} -> {result['loss_last']:.3f}, "
          f"{result['skipped_updates']} skipped update(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
