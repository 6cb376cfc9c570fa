"""How long training steps wait on the network for shards in an object store, prefetch off and on
(`bertscale bench remote`).

Shards are prepared from real text, uploaded to a local S3 server on 127.0.0.1 (moto's, through
`bertscale.bench.s3_server`, so the test extra ``moto[server]`` is needed) whose object reads are
throttled to ``--bandwidth-mbs`` MB/s on one shared link with ``--latency-ms`` before each
response's first byte. One rank's train loader then reads ``--windows`` shuffle windows from a
fresh cache, and a training step is simulated by sleeping ``--step-ms`` after each global batch
(the GPU's time: a data loader only has to keep up with it). Per step it records the time its
reads waited for a shard to arrive (``PretrainLoader.fetch_wait_s``) and the time in ``next()``.

It prints, for prefetch off and on: the wait in the first window (a cold cache: nothing to
prefetch from), in the later windows (the steady state), and the longest single wait there.
Limits: one process on one node (the node cache's once-per-node sharing is tested in
tests/test_remote.py, not timed here); the throttle models bandwidth and latency, not a store's
request-rate limits or tail latencies.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bertscale.data.shards import Manifest


def bench_remote(files: list[Path], vocab: Path, *, samples_per_shard: int, window_shards: int,
                 global_batch: int, step_ms: float, windows: int, bandwidth_mbs: float,
                 latency_ms: float, concurrency: int, work_dir: Path | None = None) -> dict[str, Any]:
    import fsspec

    from bertscale.bench.s3_server import LocalS3
    from bertscale.data.prepare import PrepareConfig, run_prepare, upload_prepared
    from bertscale.data.shards import read_manifest

    server = LocalS3(bandwidth=bandwidth_mbs * 1e6, latency=latency_ms / 1e3)
    os.environ.update(server.env())
    result: dict[str, Any] = {"bandwidth_mbs": bandwidth_mbs, "latency_ms": latency_ms,
                              "step_ms": step_ms, "global_batch": global_batch,
                              "samples_per_shard": samples_per_shard,
                              "window_shards": window_shards, "concurrency": concurrency}
    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            local = run_prepare(PrepareConfig(inputs=[str(f) for f in files], out=Path(tmp) / "d",
                                              vocab=vocab, seq_lens=[128],
                                              samples_per_shard=samples_per_shard,
                                              progress="none"))[128]
            fsspec.filesystem("s3").mkdir("bench")
            bw, server.bandwidth = server.bandwidth, 0.0  # upload unthrottled
            url = upload_prepared(local, "s3://bench/d/seq128", verbose=False)
            server.bandwidth = bw
            m = read_manifest(url, cache_dir=Path(tmp) / "m")
            shard_mb = sum(s.bytes for s in m.shards["train"]) / len(m.shards["train"]) / 1e6
            window = window_shards * samples_per_shard
            steps_per_window = window / global_batch
            steps = min(int(windows * steps_per_window), 10 * m.num_samples("train") // global_batch)
            result.update(shard_mb=shard_mb, steps=steps, steps_per_window=steps_per_window,
                          train_shards=len(m.shards["train"]))
            print(f"{len(m.shards['train'])} train shards of {shard_mb:.2f} MB, windows of "
                  f"{window_shards} shards ({steps_per_window:.1f} steps of {global_batch}); link "
                  f"{bandwidth_mbs:g} MB/s + {latency_ms:g} ms latency; a step computes "
                  f"{step_ms:g} ms; {steps} steps")
            print(f"{'prefetch':>8} | {'first window wait':>17} | {'later windows wait':>18} | "
                  f"{'longest later wait':>18} | {'steps waiting >1 ms':>19} | {'wall':>6}")
            for prefetch in (False, True):
                row = _timed_pass(m, prefetch, steps=steps, first=int(steps_per_window),
                                  global_batch=global_batch, window=window, step_ms=step_ms,
                                  concurrency=concurrency, cache_dir=Path(tmp) / f"c{prefetch}")
                result["prefetch_on" if prefetch else "prefetch_off"] = row
                print(f"{'on' if prefetch else 'off':>8} | {row['first_window_wait_s']:15.2f} s | "
                      f"{row['later_wait_s']:16.2f} s | {row['later_max_wait_ms']:15.1f} ms | "
                      f"{row['later_steps_waiting']:>9} of {row['later_steps']:<6} | "
                      f"{row['wall_s']:5.1f}s")
    finally:
        server.stop()
    return result


def _timed_pass(m: Manifest, prefetch: bool, *, steps: int, first: int, global_batch: int,
                window: int, step_ms: float, concurrency: int, cache_dir: Path) -> dict[str, Any]:
    """`steps` training steps' worth of batches from the store, each followed by `step_ms` of
    (simulated) device work: the time the steps waited for shards, the first window (`first`
    steps, fetched cold) apart from the later ones (where prefetch should hide the fetches)."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader

    loader = open_loader(m, LoaderConfig(
        split="train", global_batch_size=global_batch, micro_batch_size=global_batch,
        seed=1, shuffle_window=window, verify_sha256=False,
        fetch=FetchSettings(cache_dir=cache_dir, prefetch=prefetch, concurrency=concurrency)))
    waits = []
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        before = loader.fetch_wait_s
        next(it)
        waits.append(loader.fetch_wait_s - before)
        time.sleep(step_ms / 1e3)  # the device's step
    wall = time.perf_counter() - start
    loader.close()
    later = waits[first:]
    return {"first_window_wait_s": sum(waits[:first]),
            "later_wait_s": sum(later), "later_max_wait_ms": 1e3 * max(later, default=0),
            "later_steps_waiting": sum(w > 1e-3 for w in later),
            "later_steps": len(later), "wall_s": wall}
