"""Shards in an object store: a real S3 API on 127.0.0.1 (moto's server, started here, with a
layer that counts the bytes it serves per object and can cut a transfer midway), real shards that
`bertscale prepare --out s3://…` made from the shared Wikipedia and uploaded, and real
`bertscale pretrain` / `doctor` runs reading them through the node cache.

- 2 ranks trained from the store give the losses of the same run from local shards
  (tests/pretrain_runs.py's cached ZeRO-2 run, same recipe and seed); each shard is downloaded
  once for the node although both ranks read it; a job killed during its downloads leaves no
  partial shard, and the next job cleans up and fetches again; an eval shard whose first transfer
  the server cuts midway is fetched again; a requeue (resume) reuses the cache, fetching none.
- A corrupt object stops the run with exit 2 and one line naming it.
- The cache bound holds at every step over several epochs (library level: only the loader can
  be looked at between steps), and a bound too small for two windows is refused at start.
- `doctor` reads the first and last shard in the store, and names one that is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("moto.moto_server.werkzeug_app", reason="needs the test extra (moto[server])")
pytest.importorskip("s3fs", reason="needs the s3 extra (s3fs)")

from bertscale.bench.s3_server import LocalS3
from launch import run_ranks
from pretrain_runs import (WIKI_FILES, WS2, manifest, pretrain_argv, records,  # noqa: F401
                           train_losses, ws2_straight)

BUCKET = "bkt"


@pytest.fixture(scope="module")
def s3():
    server = LocalS3()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    import fsspec
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _prepare(shared_data: Path, stage: Path, url: str, *files: str, per_shard: int) -> str:
    """`bertscale prepare --out s3://…` with pretrain_runs.prepare_wiki's settings."""
    from bertscale.commands.prepare import main as prepare
    rc = prepare([*(str(shared_data / "wikipedia" / f) for f in files), "--out", url,
                  "--stage", str(stage), "--vocab",
                  str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"),
                  "--samples-per-shard", str(per_shard), "--eval-fraction", "0.05",
                  "--seed", "12345", "--progress", "none"])
    assert rc == 0
    return f"{url}/seq128/manifest.json"


@pytest.fixture(scope="module")
def store(s3, shared_data, tmp_path_factory) -> str:
    return _prepare(shared_data, tmp_path_factory.mktemp("stage"), f"s3://{BUCKET}/wiki",
                    *WIKI_FILES, per_shard=1000)


def _key(url: str) -> str:
    return url.split("://", 1)[1]


def _stderr_lines(results) -> list[str]:
    return [line for r in results for line in r.stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three trainer starts (and the local run, when not cached yet)
def test_pretrain_from_s3_equals_local_once_per_node(s3, store, manifest, ws2_straight, tmp_path):
    from bertscale.data.shards import read_manifest
    local, remote_m = read_manifest(manifest), read_manifest(store, cache_dir=tmp_path / "m")
    assert remote_m.fingerprint == local.fingerprint  # the same data, uploaded by prepare
    assert remote_m.shard_location("train", 0).startswith(f"s3://{BUCKET}/wiki/seq128/")
    cache, run = tmp_path / "cache", tmp_path / "run"
    argv = pretrain_argv(run, store, *WS2, f"data.cache_dir={str(cache)!r}")
    sizes = {_key(remote_m.shard_location(sp, i)): info.bytes
             for sp, infos in remote_m.shards.items() for i, info in enumerate(infos)}

    # A job killed (SIGKILL) in the middle of its downloads, over a slow link: it leaves .part
    # files only, never a partial shard under a shard's name.
    s3.reset_counts()
    s3.bandwidth = 200e3
    killed = subprocess.Popen([sys.executable, *pretrain_argv(tmp_path / "killed", store, *WS2,
                                                              f"data.cache_dir={str(cache)!r}")],
                              env={**os.environ, **s3.env()}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(0 < s3.served[k] < n // 2 for k, n in sizes.items()):
            assert killed.poll() is None and time.monotonic() < deadline, "no download began"
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
        s3.bandwidth = 0.0
    assert list(cache.rglob("*.part-*")), "the kill came after the downloads"
    assert not list(cache.rglob("*.tar"))
    s3.wait_idle()  # the dead job's responses end before the counting starts

    eval_shard = remote_m.shard_location("eval", 0)
    s3.reset_counts()
    s3.cut_next(_key(eval_shard), 0.5)  # its first transfer breaks off halfway

    run_ranks(argv + ["--stop-at-step", "4"], 2, env=s3.env(), timeout=400)
    fetched = {k: n for k, n in s3.served.items() if k in sizes}
    assert fetched, "nothing was read from the store"
    cut = _key(eval_shard)
    assert fetched.pop(cut) == sizes[cut] + sizes[cut] // 2  # half, then once whole
    assert fetched == {k: sizes[k] for k in fetched}  # every other shard: once for both ranks
    assert not list(cache.rglob("*.part-*"))
    assert {p.name: p.stat().st_size for p in cache.rglob("*.tar")} == {
        k.rsplit("/", 1)[1]: n for k, n in sizes.items() if k in s3.served}

    s3.reset_counts()  # the requeued job: same cache, nothing fetched again
    run_ranks(argv, 2, env=s3.env(), timeout=400)
    assert not {k for k in s3.served if k in sizes}
    assert train_losses(run) == train_losses(ws2_straight)
    evals = {r["step"]: r["loss"] for r in records(run, "eval")}
    assert evals == {r["step"]: r["loss"] for r in records(ws2_straight, "eval")}


@pytest.mark.slow
def test_corrupt_object_is_named(s3, store, tmp_path):
    import fsspec
    fs = fsspec.filesystem("s3")
    src, bad = _key(store).rsplit("/", 1)[0], f"{BUCKET}/corrupt/seq128"
    for path in fs.ls(src):
        data = fs.cat_file(path)
        if path.endswith(".tar"):
            data = bytearray(data)
            data[3000] ^= 0xFF
        fs.pipe_file(f"{bad}/{path.rsplit('/', 1)[1]}", bytes(data))
    argv = pretrain_argv(tmp_path / "run", f"s3://{bad}/manifest.json", *WS2,
                         f"data.cache_dir={str(tmp_path / 'cache')!r}", "data.fetch_retries=1")
    (r,) = run_ranks(argv, 1, env=s3.env(), timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"fetched from s3://{bad}/train-0000" in errors[0] and "sha256" in errors[0]
    assert not list((tmp_path / "cache").rglob("*.tar"))  # nothing unverified kept


def test_cache_bound_holds_every_step(s3, shared_data, tmp_path):
    """Library level: the cache's size and content between steps is what is checked, which the
    command does not show. Many small shards and windows of about one shard, over 3 epochs."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader
    from bertscale.data.shards import read_manifest
    from bertscale.errors import UserError

    url = _prepare(shared_data, tmp_path / "stage", f"s3://{BUCKET}/small", "wiki_00.gz",
                   per_shard=150)
    m = read_manifest(url, cache_dir=tmp_path / "m")
    infos = m.shards["train"]
    assert len(infos) >= 8
    window = 150
    biggest = sorted((i.bytes for i in infos), reverse=True)
    limit = sum(biggest[:6])  # a window of one shard's samples touches <= 3 shards
    with pytest.raises(UserError, match=r"data.cache_limit_gb = .* smaller than two shuffle windows"):
        open_loader(m, LoaderConfig(
            split="train", global_batch_size=30, micro_batch_size=30, rank=0, world_size=1, seed=3,
            shuffle_window=window,
            fetch=FetchSettings(cache_dir=tmp_path / "c", limit_bytes=limit - 1)))
    cache = tmp_path / "cache"
    loader = open_loader(m, LoaderConfig(
        split="train", global_batch_size=30, micro_batch_size=30, rank=0, world_size=1, seed=3,
        shuffle_window=window, fetch=FetchSettings(cache_dir=cache, limit_bytes=limit)))
    fetcher, order = loader.fetcher, loader.order
    s3.reset_counts()
    steps = 3 * m.num_samples("train") // 30
    seen = []
    for k, batch in zip(range(steps), loader):
        used = fetcher.cache.usage()
        assert used <= limit, (k, used, limit)
        # What may not be evicted is at most two windows (what the check above prices): a batch
        # across a window boundary does not also protect the window after.
        held = [i for i in range(len(infos)) if fetcher.cache.path(fetcher.key(i)) in fetcher.protected]
        assert sum(infos[i].bytes for i in held) <= limit, (k, held)
        e, w = order.window_of(30 * k)
        need = order.window_shards(e, w)
        assert all(fetcher.cache.cached(fetcher.key(i), infos[i].bytes) for i in need)
        seen.append(batch["sample_ids"])
    loader.close()
    served = sum(n for key, n in s3.served.items() if "/small/" in key)
    total = sum(i.bytes for i in infos)
    assert served > total  # evicted shards came back in later epochs: the bound did bind
    assert not list(cache.rglob("*.part-*"))


@pytest.mark.slow
def test_doctor_reads_the_store(s3, store, tmp_path):
    import fsspec
    from bertscale.data.shards import read_manifest
    m = read_manifest(store, cache_dir=tmp_path / "m")
    ok = run_ranks(["-m", "bertscale.cli", "doctor", "--manifest", store, "--no-wandb"], 1,
                   env=s3.env(), timeout=180, check=False)
    assert ok[0].returncode == 0, ok[0].stderr[-2000:]
    n = sum(len(v) for v in m.shards.values())
    assert f"0/{n} shards" in ok[0].stdout and "the first and last are readable" in ok[0].stdout

    fs = fsspec.filesystem("s3")
    src, gone = _key(store).rsplit("/", 1)[0], f"{BUCKET}/gone/seq128"
    fs.copy(src + "/", gone + "/", recursive=True)
    last = m.shard_location("eval", len(m.shards["eval"]) - 1).rsplit("/", 1)[1]
    fs.rm(f"{gone}/{last}")
    bad = run_ranks(["-m", "bertscale.cli", "doctor", "--manifest", f"s3://{gone}/manifest.json",
                     "--no-wandb"], 1, env=s3.env(), timeout=180, check=False)
    assert bad[0].returncode == 1
    lines = [x for x in _stderr_lines(bad) if "FAIL" in x]
    assert len(lines) == 1 and f"s3://{gone}/{last}: cannot be read: no such object" in lines[0]


def _prepare_rc(shared_data: Path, stage: Path, url: str, seed: int, capfd,
                progress: str = "none") -> tuple[int, str]:
    """`bertscale prepare --out URL` of one Wikipedia file; (exit code, stderr)."""
    from bertscale.commands.prepare import main as prepare
    capfd.readouterr()
    rc = prepare([str(shared_data / "wikipedia" / "wiki_00.gz"), "--out", url, "--stage",
                  str(stage), "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"),
                  "--samples-per-shard", "300", "--eval-fraction", "0.05", "--seed", str(seed),
                  "--progress", progress])
    return rc, capfd.readouterr().err


def _store_matches(fs, prefix: str, manifest: Path) -> bool:
    """Every shard object under `prefix` has the sha256 `manifest` lists."""
    import hashlib
    import json
    rows = [r for rs in json.loads(manifest.read_text())["shards"].values() for r in rs]
    return all(hashlib.sha256(fs.cat_file(f"{prefix}/{r['name']}")).hexdigest() == r["sha256"]
               for r in rows)


def test_prepare_never_mixes_two_data_sets_in_one_prefix(s3, shared_data, tmp_path, capfd):
    """`prepare --out s3://PREFIX` where PREFIX holds another prepare's shards (same names, same
    sizes: another --seed) is refused with one line, and the store keeps the first data set
    whole. An upload that stops midway (here: a staged shard that no longer matches its
    manifest, caught before it is sent) leaves a record of what it was uploading; the re-run
    sends only what is missing, and the prefix then holds exactly the second data set.

    Failed before the fix: the second prepare exited 0 with "uploaded 0 of 12 files (the rest
    were there)": the skip compared sizes only, so the prefix's manifest named the new shards'
    sha256 over the old shards' bytes, and training stopped on sha256 mismatches."""
    import fsspec
    fs = fsspec.filesystem("s3")
    prefix = f"{BUCKET}/clash/seq128"
    rc, _ = _prepare_rc(shared_data, tmp_path / "a", f"s3://{BUCKET}/clash", 1, capfd)
    assert rc == 0
    first, second = tmp_path / "a/seq128/manifest.json", tmp_path / "b/seq128/manifest.json"
    rc, err = _prepare_rc(shared_data, tmp_path / "b", f"s3://{BUCKET}/clash", 2, capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and f"s3://{prefix}: holds the manifest of other shards" in lines[0], err
    assert fs.cat_file(f"{prefix}/manifest.json") == first.read_bytes()
    assert _store_matches(fs, prefix, first)
    # Full shards of both have one size: what made the size comparison useless.
    sizes = lambda m: [r["bytes"] for r in json.loads(m.read_text())["shards"]["train"]]  # noqa: E731
    assert len(sizes(first)) >= 3 and sizes(first)[:3] == sizes(second)[:3]

    # The second data set into its own prefix; the third shard's staged file is damaged.
    from bertscale.data.prepare import UPLOAD_RECORD
    url2, prefix2 = f"s3://{BUCKET}/clash2", f"{BUCKET}/clash2/seq128"
    third = tmp_path / "b/seq128" / json.loads(second.read_text())["shards"]["train"][2]["name"]
    good = third.read_bytes()
    third.write_bytes(good[:4000] + bytes([good[4000] ^ 0xFF]) + good[4001:])
    rc, err = _prepare_rc(shared_data, tmp_path / "b", url2, 2, capfd)
    assert rc == 2 and f"{third}: its sha256 is not the one" in err, err[-2000:]
    assert not fs.exists(f"{prefix2}/manifest.json") and fs.exists(f"{prefix2}/{UPLOAD_RECORD}")
    assert not fs.exists(f"{prefix2}/{third.name}")
    third.write_bytes(good)
    rc, err = _prepare_rc(shared_data, tmp_path / "b", url2, 2, capfd, progress="log")
    # Sent in manifest order, then the vocabulary: those before the damaged one were kept.
    names = [r["name"] for rs in json.loads(second.read_text())["shards"].values() for r in rs]
    n, kept = len(names) + 1, names.index(third.name)
    assert kept >= 2 and rc == 0 and f"uploaded {n - kept} of {n} files" in err, err[-2000:]
    assert fs.cat_file(f"{prefix2}/manifest.json") == second.read_bytes()
    assert not fs.exists(f"{prefix2}/{UPLOAD_RECORD}") and _store_matches(fs, prefix2, second)
