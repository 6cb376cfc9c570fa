"""Shards in an object store: real S3, GCS and Azure Blob APIs on 127.0.0.1 (moto's server,
gcp-storage-emulator and Azurite, tests/stores.py, each with a layer that counts the bytes served
per object and can cut a transfer midway), real shards that `bertscale prepare --out URL` made
from the shared Wikipedia and uploaded, and real `bertscale pretrain` / `doctor` runs reading
them through the node cache. bertscale is pointed at each store by the environment a user sets
(docs/data.md), nothing else.

- 2 ranks trained from the store give the losses of the same run from local shards
  (tests/pretrain_runs.py's cached ZeRO-2 run, same recipe and seed); each shard is downloaded
  once for the node although both ranks read it; an eval shard whose first transfer the server
  cuts midway is fetched again. On S3 also: a job killed during its downloads leaves no partial
  shard, and the next job cleans up and fetches again; a requeue (resume) reuses the cache,
  fetching none. Those two are the node cache's own behaviour, the same whatever client filled
  it, so GCS and Azure run one 2-rank job each (to step 4) rather than three.
- A corrupt object stops the run with exit 2 and one line naming it (each store).
- `prepare --out URL` never mixes two data sets in one prefix and resumes a cut upload, and one
  into a bucket that does not exist stops before it starts (each).
- Refused credentials fail at once, as one line (Azurite checks the account key).
- A shard larger than each client's single-request upload and than one ranged read comes back
  whole, each byte served once (each store).
- The cache bound holds at every step over several epochs (library level: only the loader can
  be looked at between steps), and a bound too small for two windows is refused at start.
- `doctor` reads the first and last shard in the store, and names one that is missing (each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import run_ranks
from pretrain_runs import (WIKI_FILES, WS2, manifest, pretrain_argv, records,  # noqa: F401
                           train_losses, ws2_straight)
from stores import KINDS, Store

each_store = pytest.mark.parametrize("store", KINDS, indirect=True)


@pytest.fixture(scope="module")
def uploads() -> dict[str, str]:
    """Store kind -> the manifest URL of pretrain_runs' Wikipedia shards in that store, uploaded
    once per module by `uploaded`."""
    return {}


def uploaded(uploads: dict[str, str], store: Store, shared_data: Path, local: Path) -> str:
    """`bertscale prepare --out URL` of the shards the local runs train on (their folder as the
    stage: prepare finds it complete, with the same settings, and only uploads)."""
    if store.kind not in uploads:
        uploads[store.kind] = _prepare(shared_data, local.parent.parent, store.url("wiki"),
                                       *WIKI_FILES, per_shard=1000)
    return uploads[store.kind]


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


def _key(url: str) -> str:
    return url.split("://", 1)[1]


def _stderr_lines(results) -> list[str]:
    return [line for r in results for line in r.stderr.splitlines() if line.strip()]


def _shard_sizes(m) -> dict[str, int]:
    """bucket/key -> bytes of every shard of a manifest read from a store."""
    return {Store.key(m.shard_location(sp, i)): info.bytes
            for sp, infos in m.shards.items() for i, info in enumerate(infos)}


def _fetched_once_for_the_node(server, sizes: dict[str, int], cut: str) -> None:
    """What a 2-rank job read from the store: the shard whose first transfer was cut halfway,
    half and then once whole (the store client retried it); every other shard it read, once."""
    fetched = {k: n for k, n in server.served.items() if k in sizes}
    assert fetched, "nothing was read from the store"
    assert fetched.pop(cut) == sizes[cut] + sizes[cut] // 2
    assert fetched == {k: sizes[k] for k in fetched}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three trainer starts (and the local run, when not cached yet)
def test_pretrain_from_s3_equals_local_once_per_node(store, uploads, shared_data, manifest,
                                                     ws2_straight, tmp_path):
    from bertscale.data.shards import read_manifest
    url = uploaded(uploads, store, shared_data, manifest)
    local, remote_m = read_manifest(manifest), read_manifest(url, cache_dir=tmp_path / "m")
    assert remote_m.fingerprint == local.fingerprint  # the same data, uploaded by prepare
    assert remote_m.shard_location("train", 0).startswith(store.url("wiki/seq128/"))
    cache, run, s3 = tmp_path / "cache", tmp_path / "run", store.server
    argv = pretrain_argv(run, url, *WS2, f"data.cache_dir={str(cache)!r}")
    sizes = _shard_sizes(remote_m)

    # A job killed (SIGKILL) in the middle of its downloads, over a slow link: it leaves .part
    # files only, never a partial shard under a shard's name.
    s3.reset_counts()
    s3.bandwidth = 200e3
    killed = subprocess.Popen([sys.executable, *pretrain_argv(tmp_path / "killed", url, *WS2,
                                                              f"data.cache_dir={str(cache)!r}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    cut = Store.key(remote_m.shard_location("eval", 0))
    s3.reset_counts()
    s3.cut_next(cut, 0.5)  # its first transfer breaks off halfway

    run_ranks(argv + ["--stop-at-step", "4"], 2, timeout=400)
    _fetched_once_for_the_node(s3, sizes, cut)
    assert not list(cache.rglob("*.part-*"))
    assert {p.name: p.stat().st_size for p in cache.rglob("*.tar")} == {
        k.rsplit("/", 1)[1]: n for k, n in sizes.items() if k in s3.served}

    s3.reset_counts()  # the requeued job: same cache, nothing fetched again
    run_ranks(argv, 2, timeout=400)
    assert not {k for k in s3.served if k in sizes}
    assert train_losses(run) == train_losses(ws2_straight)
    evals = {r["step"]: r["loss"] for r in records(run, "eval")}
    assert evals == {r["step"]: r["loss"] for r in records(ws2_straight, "eval")}


@pytest.mark.slow
@pytest.mark.parametrize("store", ["gs", "az"], indirect=True)
def test_pretrain_from_gcs_and_azure_equals_local_once_per_node(store, uploads, shared_data,
                                                                manifest, ws2_straight, tmp_path):
    """The S3 test's reads through gcsfs / adlfs, in one 2-rank job to step 4 (training and
    the step-4 evaluation): the losses of the local run, each shard fetched once for the node,
    a cut transfer fetched again."""
    from bertscale.data.shards import read_manifest
    url = uploaded(uploads, store, shared_data, manifest)
    remote_m = read_manifest(url, cache_dir=tmp_path / "m")
    assert remote_m.fingerprint == read_manifest(manifest).fingerprint
    assert remote_m.shard_location("train", 0).startswith(store.url("wiki/seq128/"))
    cache, run = tmp_path / "cache", tmp_path / "run"
    cut = Store.key(remote_m.shard_location("eval", 0))
    store.server.reset_counts()
    store.server.cut_next(cut, 0.5)
    run_ranks(pretrain_argv(run, url, *WS2, f"data.cache_dir={str(cache)!r}")
              + ["--stop-at-step", "4"], 2, timeout=400)
    _fetched_once_for_the_node(store.server, _shard_sizes(remote_m), cut)
    assert not list(cache.rglob("*.part-*"))
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == {k: v for k, v in train_losses(ws2_straight).items() if k <= 4}
    evals = {r["step"]: r["loss"] for r in records(run, "eval")}
    assert list(evals) == [4]
    assert evals == {r["step"]: r["loss"] for r in records(ws2_straight, "eval") if r["step"] == 4}


@pytest.mark.slow
@each_store
def test_corrupt_object_is_named(store, uploads, shared_data, manifest, tmp_path):
    fs = store.fs()
    src = Store.key(uploaded(uploads, store, shared_data, manifest)).rsplit("/", 1)[0]
    bad = Store.key(store.url("corrupt/seq128"))
    for path in fs.ls(src):
        data = fs.cat_file(path)
        if path.endswith(".tar"):
            data = bytearray(data)
            data[3000] ^= 0xFF
        fs.pipe_file(f"{bad}/{path.rsplit('/', 1)[1]}", bytes(data))
    argv = pretrain_argv(tmp_path / "run", f"{store.kind}://{bad}/manifest.json", *WS2,
                         f"data.cache_dir={str(tmp_path / 'cache')!r}", "data.fetch_retries=1")
    (r,) = run_ranks(argv, 1, timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"fetched from {store.kind}://{bad}/train-0000" in errors[0] and "sha256" in errors[0]
    assert not list((tmp_path / "cache").rglob("*.tar"))  # nothing unverified kept


def test_cache_bound_holds_every_step(store, shared_data, tmp_path):
    """Library level: the cache's size and content between steps is what is checked, which the
    command does not show. Many small shards and windows of about one shard, over 3 epochs.
    On S3 only: the bound is the node cache's, whatever client fills it."""
    from bertscale.data.cache import FetchSettings
    from bertscale.data.loader import LoaderConfig, open_loader
    from bertscale.data.shards import read_manifest
    from bertscale.errors import UserError

    url = _prepare(shared_data, tmp_path / "stage", store.url("small"), "wiki_00.gz",
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
    store.server.reset_counts()
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
    served = sum(n for key, n in store.server.served.items() if "/small/" in key)
    total = sum(i.bytes for i in infos)
    assert served > total  # evicted shards came back in later epochs: the bound did bind
    assert not list(cache.rglob("*.part-*"))


@pytest.mark.slow
@each_store
def test_doctor_reads_the_store(store, uploads, shared_data, manifest, tmp_path):
    from bertscale.data.shards import read_manifest
    url = uploaded(uploads, store, shared_data, manifest)
    m = read_manifest(url, cache_dir=tmp_path / "m")
    ok = run_ranks(["-m", "bertscale.cli", "doctor", "--manifest", url, "--no-wandb"], 1,
                   timeout=180, check=False)
    assert ok[0].returncode == 0, ok[0].stderr[-2000:]
    n = sum(len(v) for v in m.shards.values())
    assert f"0/{n} shards" in ok[0].stdout and "the first and last are readable" in ok[0].stdout

    fs = store.fs()
    src, gone = Store.key(url).rsplit("/", 1)[0], Store.key(store.url("gone/seq128"))
    fs.copy(src + "/", gone + "/", recursive=True)
    last = m.shard_location("eval", len(m.shards["eval"]) - 1).rsplit("/", 1)[1]
    fs.rm(f"{gone}/{last}")
    bad = run_ranks(["-m", "bertscale.cli", "doctor", "--manifest",
                     f"{store.kind}://{gone}/manifest.json", "--no-wandb"], 1, timeout=180,
                    check=False)
    assert bad[0].returncode == 1
    lines = [x for x in _stderr_lines(bad) if "FAIL" in x]
    assert len(lines) == 1, _stderr_lines(bad)
    assert f"{store.kind}://{gone}/{last}: cannot be read: no such object" in lines[0]


@pytest.mark.parametrize("store", ["az"], indirect=True)
def test_refused_credentials_fail_at_once(store, shared_data, tmp_path, monkeypatch, capfd):
    """A wrong account key (Azurite checks it; moto and gcp-storage-emulator accept anything):
    `prepare` of inputs in the store stops with one line saying access was denied, and a shard
    fetch is not retried (library level: the command reads the manifest with the same key
    first, so it never reaches the shard fetch; the fetch's classification is seen here).

    Failed before the fix: prepare's line was "HttpResponseError: Server failed to
    authenticate ... RequestId:... Time:...</Message> </Error>" (Azure's XML body joined into
    it), and the fetch retried 3 times with backoff (7 s here, 15.5 s at the default 5 retries)
    before "after 4 attempts": only FileNotFoundError and PermissionError counted as permanent,
    and adlfs raises azure-core's HttpResponseError (status 403) for a refused key."""
    from bertscale.data.cache import NodeCache
    from bertscale.commands.prepare import main as prepare
    from bertscale.errors import UserError
    from stores import clear_clients

    vocab = shared_data / "vocab" / "bert-base-uncased-vocab.txt"
    store.fs().put_file(str(vocab), Store.key(store.url("in/vocab.txt")))
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", store.env[
        "AZURE_STORAGE_CONNECTION_STRING"].replace("AccountKey=Eby8", "AccountKey=Xby8"))
    clear_clients("az")
    capfd.readouterr()
    rc = prepare([store.url("in/vocab.txt"), "--out", str(tmp_path / "out"), "--vocab",
                  str(vocab), "--progress", "none"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert f"error: input {store.url('in/vocab.txt')}: access denied, check the credentials " \
        f"in the environment (" in lines[0] and "AuthorizationFailure" in lines[0], lines

    start = time.monotonic()
    with pytest.raises(UserError) as e:
        NodeCache(tmp_path / "cache").fetch("k/vocab.txt", store.url("in/vocab.txt"),
                                            vocab.stat().st_size, "0" * 64, retries=3,
                                            backoff_s=1.0)
    assert time.monotonic() - start < 5
    assert str(e.value).startswith(f"shard vocab.txt: cannot fetch {store.url('in/vocab.txt')}: "
                                   f"access denied")
    assert not list((tmp_path / "cache").rglob("*.part-*"))


@each_store
def test_a_large_shard_round_trips_once(store, tmp_path):
    """Library level (prepare's shards here are ~1 MB; a 70 MB one would cost minutes of
    prepare): a shard larger than every client's single-request upload (s3fs multipart above
    50 MB, gcsfs resumable above 5 MB, adlfs blocks above 64 MB) goes up with prepare's upload
    call and comes back through the node cache, in several ranged reads, whole and verified,
    each byte served once."""
    import hashlib

    from bertscale.data import remote
    from bertscale.data.cache import NodeCache

    data = os.urandom(70 << 20)
    (tmp_path / "big.tar").write_bytes(data)
    url = store.url("big/train-000000.tar")
    remote.upload(tmp_path / "big.tar", url)
    assert remote.object_size(url) == len(data)
    store.server.reset_counts()
    got = NodeCache(tmp_path / "cache").fetch("k/train-000000.tar", url, len(data),
                                               hashlib.sha256(data).hexdigest())
    assert got.read_bytes() == data
    assert store.server.served[Store.key(url)] == len(data)
    assert store.server.gets[Store.key(url)] > 1  # several ranged reads (6 here)


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
    rows = [r for rs in json.loads(manifest.read_text())["shards"].values() for r in rs]
    return all(hashlib.sha256(fs.cat_file(f"{prefix}/{r['name']}")).hexdigest() == r["sha256"]
               for r in rows)


@each_store
def test_prepare_into_a_missing_bucket_stops_before_preparing(store, shared_data, tmp_path, capfd):
    """`prepare --out URL` whose bucket (container) does not exist: one line at once, before
    any work (bertscale creates no buckets: their region, access and billing are the owner's).

    Failed before the fix: the whole prepare ran, then its upload stopped with "uploading
    .../manifest.json to s3://.../.bertscale-upload.json: no such object (The specified bucket
    does not exist)" (gcsfs: "(http://127.0.0.1:PORT/upload/storage/v1/b/NAME/o)")."""
    missing = f"{store.kind}://no-such-{store.bucket}"
    rc, err = _prepare_rc(shared_data, tmp_path / "stage", f"{missing}/wiki", 1, capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and lines == [f"bertscale prepare: error: --out {missing}/wiki: there is no "
                                 f"bucket no-such-{store.bucket} (create it first)"], err
    assert not (tmp_path / "stage").exists()


@each_store
def test_prepare_never_mixes_two_data_sets_in_one_prefix(store, shared_data, tmp_path, capfd):
    """`prepare --out URL/PREFIX` where PREFIX holds another prepare's shards (same names, same
    sizes: another --seed) is refused with one line, and the store keeps the first data set
    whole. An upload that stops midway (here: a staged shard that no longer matches its
    manifest, caught before it is sent) leaves a record of what it was uploading; the re-run
    sends only what is missing, and the prefix then holds exactly the second data set.

    Failed before the fix: the second prepare exited 0 with "uploaded 0 of 12 files (the rest
    were there)": the skip compared sizes only, so the prefix's manifest named the new shards'
    sha256 over the old shards' bytes, and training stopped on sha256 mismatches."""
    fs = store.fs()
    prefix = Store.key(store.url("clash/seq128"))
    rc, _ = _prepare_rc(shared_data, tmp_path / "a", store.url("clash"), 1, capfd)
    assert rc == 0
    first, second = tmp_path / "a/seq128/manifest.json", tmp_path / "b/seq128/manifest.json"
    rc, err = _prepare_rc(shared_data, tmp_path / "b", store.url("clash"), 2, capfd)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and f"{store.kind}://{prefix}: holds the manifest of other shards" \
        in lines[0], err
    assert fs.cat_file(f"{prefix}/manifest.json") == first.read_bytes()
    assert _store_matches(fs, prefix, first)
    # Full shards of both have one size: what made the size comparison useless.
    sizes = lambda m: [r["bytes"] for r in json.loads(m.read_text())["shards"]["train"]]  # noqa: E731
    assert len(sizes(first)) >= 3 and sizes(first)[:3] == sizes(second)[:3]

    # The second data set into its own prefix; the third shard's staged file is damaged.
    from bertscale.data.prepare import UPLOAD_RECORD
    url2, prefix2 = store.url("clash2"), Store.key(store.url("clash2/seq128"))
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
    fs.invalidate_cache()
    assert fs.cat_file(f"{prefix2}/manifest.json") == second.read_bytes()
    assert not fs.exists(f"{prefix2}/{UPLOAD_RECORD}") and _store_matches(fs, prefix2, second)
