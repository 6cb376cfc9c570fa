"""`bertscale prepare` on the data users hold: the real Wikipedia sample written, in the test, as
JSON lines, as Parquet (by Hugging Face `datasets` and by pyarrow, a Hub-snapshot folder with its
README), as a `datasets.save_to_disk` folder, as one paragraph per row with a document-id column,
and as Parquet in an object store (real S3, GCS and Azure Blob APIs on 127.0.0.1). The same text
must give the same shards byte for byte whatever the format, the number of worker processes, or
a crash and re-run in the middle; a missing pyarrow or column is one line.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow", reason="needs the parquet extra (pyarrow)")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets", reason="needs the test extra (datasets)")

from bertscale.commands.prepare import main as prepare  # noqa: E402
from bertscale.data.shards import read_manifest  # noqa: E402
from bertscale.data.text import read_documents  # noqa: E402
from stores import KINDS  # noqa: E402

WIKI = ("wiki_00.gz", "wiki_01.gz", "wiki_02.gz")
SEQ = ("128", "512")


def _prepare_argv(shared: Path, out: Path, *inputs: str | Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [*map(str, inputs), "--vocab", str(shared / "vocab" / "bert-base-uncased-vocab.txt"),
            "--out", str(out), "--seq-len", *SEQ, "--samples-per-shard", "700",
            "--docs-per-chunk", "300", "--progress", "none", *extra]


def _shards(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in sorted(out.glob("seq*/*.tar"))}


def _same_shards(a: Path, b: Path) -> None:
    """Byte-identical shards, and manifests that list the same shards (names, counts, sha256)."""
    sa, sb = _shards(a), _shards(b)
    assert sa.keys() == sb.keys() and len(sa) > 4
    for name in sa:
        assert filecmp.cmp(sa[name], sb[name], shallow=False), f"{name} differs"
    for L in SEQ:
        ma, mb = read_manifest(a / f"seq{L}"), read_manifest(b / f"seq{L}")
        assert ma.shards == mb.shards and ma.tokenizer_hash == mb.tokenizer_hash


@pytest.fixture(scope="module")
def corpus(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The Wikipedia sample in every input layout, split into the same three units everywhere:
    `save_to_disk(num_shards=3)` divides the rows, and the other layouts follow its division."""
    base = tmp_path_factory.mktemp("corpus")
    docs = [d for f in WIKI for d in read_documents(shared_data / "wikipedia" / f)]
    rows = {"id": [str(i) for i in range(len(docs))], "title": [d[0][:40] for d in docs],
            "text": ["\n".join(d) for d in docs]}
    ds = datasets.Dataset.from_dict(rows)
    saved = base / "saved"
    ds.save_to_disk(str(saved), num_shards=3)
    arrow = sorted(saved.glob("data-*.arrow"))
    assert len(arrow) == 3
    bounds, start = [], 0
    for f in arrow:   # each file's rows, read back with pyarrow (the stream format datasets writes)
        n = pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows
        bounds.append((start, start + n))
        start += n
    assert start == len(docs) > 1500

    out = {"saved": saved}
    for name in ("jsonl", "hub", "paragraphs"):
        (base / name).mkdir()
        out[name] = base / name
    (out["hub"] / "README.md").write_text("---\nlicense: cc-by-sa-3.0\n---\n# A dataset card\n")
    for k, (lo, hi) in enumerate(bounds):
        part = f"train-{k:05d}-of-00003"
        with open(out["jsonl"] / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for i in range(lo, hi):
                f.write(json.dumps({"id": rows["id"][i], "text": rows["text"][i]}) + "\n")
        # datasets' own Parquet writer, small row groups so that the reader streams many
        ds.select(range(lo, hi)).to_parquet(str(out["hub"] / f"{part}.parquet"), batch_size=64)
        # one paragraph per row, grouped back into documents by their id
        para_ids, paras = [], []
        for i in range(lo, hi):
            for p in docs[i]:
                para_ids.append(i)
                paras.append(p)
        pq.write_table(pa.table({"doc": para_ids, "paragraph": paras}),
                       out["paragraphs"] / f"{part}.parquet", row_group_size=500)
    meta = pq.ParquetFile(out["hub"] / "train-00000-of-00003.parquet").metadata
    assert meta.num_row_groups > 5
    return out


@pytest.fixture(scope="module")
def jsonl_shards(shared_data: Path, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("from-jsonl")
    assert prepare(_prepare_argv(shared_data, out, corpus["jsonl"])) == 0
    return out


@pytest.mark.slow
def test_parquet_arrow_and_paragraph_rows_give_the_jsonl_shards(shared_data, corpus, jsonl_shards,
                                                                 tmp_path, capfd) -> None:
    # A Hub snapshot folder (datasets' Parquet beside a README.md), on 2 worker processes
    hub = tmp_path / "hub"
    assert prepare(_prepare_argv(shared_data, hub, corpus["hub"], extra=("--workers", "2"))) == 0
    _same_shards(jsonl_shards, hub)
    inputs = read_manifest(hub / "seq128").settings["inputs"]
    assert [Path(i["path"]).name for i in inputs] == [f"train-0000{k}-of-00003.parquet"
                                                      for k in range(3)]
    # A save_to_disk folder: its Arrow stream files, in state.json's order
    saved = tmp_path / "saved"
    assert prepare(_prepare_argv(shared_data, saved, corpus["saved"])) == 0
    _same_shards(jsonl_shards, saved)
    # One paragraph per row: the id column makes the documents
    paras = tmp_path / "paragraphs"
    assert prepare(_prepare_argv(shared_data, paras, corpus["paragraphs"], extra=(
        "--text-column", "paragraph", "--doc-id-column", "doc"))) == 0
    _same_shards(jsonl_shards, paras)
    # ... and without it every paragraph would be a document: other shards (the control)
    alone = tmp_path / "alone"
    assert prepare(_prepare_argv(shared_data, alone, corpus["paragraphs"],
                                 extra=("--text-column", "paragraph"))) == 0
    first = "seq128/train-000000.tar"
    assert not filecmp.cmp(_shards(jsonl_shards)[first], _shards(alone)[first], shallow=False)

    # A wrong column is one line naming the file and the columns it has
    capfd.readouterr()
    assert prepare(_prepare_argv(shared_data, tmp_path / "bad", corpus["hub"],
                                 extra=("--text-column", "body"))) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert ("train-00000-of-00003.parquet: no column 'body' (it has: id, title, text); set "
            "--text-column") in err


@pytest.mark.slow
def test_parquet_prepare_resumes_after_a_crash(shared_data, corpus, jsonl_shards, tmp_path) -> None:
    """Killed (SIGKILL) after its first unit, `prepare` re-run on the same Parquet files keeps
    the finished unit and ends with the JSON lines' shards."""
    out = tmp_path / "crash"
    argv = _prepare_argv(shared_data, out, corpus["hub"])
    proc = subprocess.Popen([sys.executable, "-m", "bertscale.commands.prepare", *argv],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / ".work" / "units").glob("u*/done.json")) and time.time() < deadline:
        assert proc.poll() is None, "prepare ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / ".work" / "units").glob("u*/done.json"))
    assert 1 <= len(done) < 3
    kept = done[0].stat().st_mtime_ns
    assert prepare([*argv, "--keep-work"]) == 0   # --keep-work: not part of the plan
    assert done[0].stat().st_mtime_ns == kept     # the finished unit was not redone
    _same_shards(jsonl_shards, out)


def test_missing_pyarrow_is_one_line(shared_data, corpus, tmp_path) -> None:
    """`prepare` of a Parquet file where pyarrow cannot be imported (a stand-in package on
    PYTHONPATH that raises ImportError, as an environment without the extra does)."""
    fake = tmp_path / "no-pyarrow" / "pyarrow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "bertscale.commands.prepare",
                        *_prepare_argv(shared_data, tmp_path / "out", corpus["hub"])],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("bertscale prepare: error: reading Parquet or Arrow files needs "
                                "pyarrow: pip install 'bertscale[parquet]'")
    assert not (tmp_path / "out" / "seq128").exists()


@pytest.mark.slow
@pytest.mark.parametrize("store", KINDS, indirect=True)
def test_parquet_in_an_object_store(store, shared_data, corpus, jsonl_shards, tmp_path) -> None:
    """Parquet files in each object store (moto's S3, gcp-storage-emulator, Azurite on
    127.0.0.1; tests/stores.py): listed by prefix, copied once per unit and hashed on the way;
    the same shards as the local JSON lines."""
    fs = store.fs()
    for f in sorted(corpus["hub"].iterdir()):
        fs.put_file(str(f), store.key(store.url("wiki", f.name)))
    out = tmp_path / "out"
    store.server.reset_counts()
    assert prepare(_prepare_argv(shared_data, out, store.url("wiki"))) == 0
    _same_shards(jsonl_shards, out)
    inputs = read_manifest(out / "seq128").settings["inputs"]
    local = read_manifest(jsonl_shards / "seq128").settings["inputs"]
    assert [i["path"] for i in inputs] == [store.url(f"wiki/train-0000{k}-of-00003.parquet")
                                           for k in range(3)]
    for i in inputs:
        key = store.key(i["path"])
        assert store.server.gets[key] == 1 and i["bytes"] == fs.info(key)["size"]
    assert len(local) == 3
    assert not list(out.rglob("input-*"))   # the copies are gone
    # The same objects named by a glob and one by its URL (library level: the listing prepare
    # starts with; a prepare per form would cost a whole run each).
    from bertscale.data.text import expand_inputs
    urls = [i["path"] for i in inputs]
    assert expand_inputs([store.url("wiki/*.parquet")]) == urls
    assert expand_inputs([urls[1]]) == [urls[1]]
