"""The checkpoint stall the training loop sees with its run folder in an object store: uploads
synchronous (every save waits for its upload and commit) vs in the background (the default).

    python benchmarks/store_checkpoint.py --manifest SHARDS/seq128/manifest.json

For each mode: a fresh moto S3 server on 127.0.0.1 (bertscale.bench.s3_server; the test extra),
one `bertscale pretrain` process, fp32 ZeRO-1, micro batch 2 at sequence 128, a save every
`--every` steps, `--saves` saves (the last one, at the end of the run, is synchronous in both
modes: the process exits after its commit). Each save's stall, as the loop measured it and
recorded it in metrics.jsonl (kind "checkpoint"), is printed, with the upload time and bandwidth
rank 0 saw. `--preset large` needs ~15 GB of memory for the trainer and the in-memory S3
server together; the default, `base` (BERT-Base), ~6 GB. `--put-mb-s` throttles the server's uploads to
model a slower link. docs/cloud.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> tuple[list[dict], float, int]:
    from bertscale.bench.s3_server import LocalS3

    s3 = LocalS3()
    s3.put_bandwidth = args.put_mb_s * 1e6
    env = {**os.environ, **s3.env(), "PYTHONUNBUFFERED": "1",
           "BERTSCALE_CHECKPOINT_UPLOAD": mode, "BERTSCALE_STAGING_DIR": str(work / mode)}
    os.environ.update(s3.env())
    import fsspec
    fs = fsspec.filesystem("s3")
    fs.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    bucket = f"bench-{mode}"  # moto's backend is one per process: a bucket per mode
    fs.mkdir(bucket)
    steps = args.every * args.saves
    argv = [sys.executable, "-m", "bertscale", "pretrain", "bert_base_phase1", "--no-wandb",
            "--run-dir", f"s3://{bucket}/run",
            "--set", f"data.manifest={json.dumps(args.manifest)}",
            "--set", f'model.preset="{args.preset}"',
            "--set", 'train.deepspeed="zero1_fp32"', "--set", "train.global_batch_size=2",
            "--set", "train.micro_batch_size=2", "--set", f"train.steps={steps}",
            "--set", f"checkpoint.every={args.every}", "--set", "checkpoint.keep=2",
            "--set", "eval.every=0", "--set", "eval.samples=2", "--set", "eval.at_start=false",
            "--set", "optimizer.name=\"adamw\"", "--set", "optimizer.lr=1e-4",
            "--set", "schedule.warmup=1",
            "--set", "logging.progress=\"plain\"", "--set", "logging.every=1"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, text=True, capture_output=True)
    wall = time.monotonic() - t0
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{mode}: bertscale pretrain exited {proc.returncode}")
    fs.invalidate_cache()
    tags = sorted(p for p in fs.ls(f"{bucket}/run/checkpoints") if p.split("_")[-1].isdigit())
    size = sum(fs.du(t, total=True) for t in tags[-1:])
    metrics = next((work / mode).iterdir()) / "metrics.jsonl"
    records = [r for r in map(json.loads, metrics.read_text().splitlines())
               if r["kind"] == "checkpoint"]
    fs.rm(bucket, recursive=True)  # moto holds it in this process's memory
    s3.stop()
    return records, wall, size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="seq-128 shards' manifest.json")
    p.add_argument("--preset", default="base", choices=("base", "large"))
    p.add_argument("--every", type=int, default=6, help="steps between saves")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--put-mb-s", type=float, default=0.0,
                   help="throttle the S3 server's uploads to this many MB/s (0: as fast as it goes)")
    p.add_argument("--work-dir", type=Path, help="staging folders (default: a temporary folder)")
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bertscale-store-bench-"))
    results = {}
    for mode in ("sync", "background"):
        results[mode] = run_mode(mode, args, work)
    size = results["sync"][2]
    print(f"{args.preset} fp32 ZeRO-1, 1 rank, checkpoint {size / 1e9:.2f} GB, moto S3 on "
          f"127.0.0.1" + (f" throttled to {args.put_mb_s:.0f} MB/s" if args.put_mb_s else ""))
    print(f"{'mode':<11} {'step':>5} {'stall s':>8} {'wait s':>7} {'save s':>7} "
          f"{'upload of':>9} {'upload s':>9} {'MB/s':>7}")
    for mode, (records, wall, _) in results.items():
        for r in records:
            print(f"{mode:<11} {r['step']:>5} {r['stall_s']:>8.2f} {r['wait_upload_s']:>7.2f} "
                  f"{r['save_s']:>7.2f} {r.get('upload_step', '-'):>9} "
                  f"{r.get('upload_s', float('nan')):>9.2f} "
                  f"{r.get('upload_mb_s', float('nan')):>7.1f}"
                  + ("  (end of run: synchronous)" if r is records[-1] else ""))
        mid = [r["stall_s"] for r in records[:-1]]
        print(f"{mode:<11} mean stall of the saves before the last: "
              f"{sum(mid) / max(len(mid), 1):.2f} s; whole run {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
