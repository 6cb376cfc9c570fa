"""How long a preempted pod needs: SIGTERM to a BERT-Large `bertscale pretrain` between steps,
until the committed checkpoint is on disk and the process has exited 75.

    python benchmarks/sigterm_commit.py --manifest SHARDS/seq128/manifest.json --run-dir /scratch/x

One process, BERT-Large (L=24, H=1024), ZeRO-1, `--precision` fp32 on a CPU machine (bf16 there is
emulated and many times slower) or the recipe's bf16 on a GPU; micro batch 2 at sequence 128,
so that a step is short and the stop measures the save. Prints the step time, the time from
SIGTERM to the commit line, to the exit, the checkpoint's size and the write bandwidth it implies.
docs/cloud.md turns these into a grace period (terminationGracePeriodSeconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="seq-128 shards' manifest.json")
    p.add_argument("--run-dir", required=True, type=Path, help="an empty folder on the disk to measure")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    ds = "zero1_fp32" if args.precision == "fp32" else "zero1_bf16"
    argv = [sys.executable, "-m", "bertscale", "pretrain", "bert_large_phase1", "--no-wandb",
            "--run-dir", str(args.run_dir), "--set", f"data.manifest={json.dumps(args.manifest)}",
            "--set", f'train.deepspeed="{ds}"', "--set", "train.global_batch_size=2",
            "--set", "train.micro_batch_size=2", "--set", "train.steps=50",
            "--set", "checkpoint.every=0", "--set", "eval.every=0", "--set", "eval.at_start=false",
            "--set", "optimizer.name=\"adamw\"", "--set", "optimizer.lr=1e-4",
            "--set", "logging.progress=\"plain\"", "--set", "logging.every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    steps: list[float] = []
    sent = committed = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        now = time.monotonic()
        if re.match(r"step \d+/", line):
            steps.append(now)
            if len(steps) == 3 and sent is None:
                proc.send_signal(signal.SIGTERM)
                sent = now
        if "committed at" in line and sent is not None:
            committed = now
    rc = proc.wait()
    exited = time.monotonic()
    if sent is None or committed is None:
        print("".join(lines[-40:]), file=sys.stderr)
        return 1
    ckpt = next(iter(sorted((args.run_dir / "checkpoints").glob("step_*[0-9]"))))
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    said = next((float(m.group(1)) for m in (re.search(r"committed at .* \(([\d.]+)s\)", x)
                                            for x in lines) if m), float("nan"))
    step_s = (steps[-1] - steps[0]) / max(len(steps) - 1, 1)
    print(f"BERT-Large {args.precision} ZeRO-1, 1 rank: step {step_s:.1f} s; SIGTERM -> commit "
          f"line {committed - sent:.1f} s (the save itself: {said:.1f} s), -> exit {rc} "
          f"{exited - sent:.1f} s; checkpoint {size / 1e9:.2f} GB, {size / 1e9 / said:.2f} GB/s")
    return 0 if rc == 75 else 1


if __name__ == "__main__":
    sys.exit(main())
