"""`bertscale prepare` on real Wikipedia: determinism across process counts and MPI, the
manifest, sample statistics, resuming after a crash, inputs and objectives.

Statistical bounds are 4.5 binomial standard deviations (see test_text.py for why).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from bertscale.commands.prepare import register
from bertscale.data.prepare import PrepareConfig, Progress, run_prepare
from bertscale.data.shards import decode_sample, member_name, read_manifest, sha256_file
from bertscale.errors import UserError
from bertscale.tokenizer import vocab_hash

FILES = ("wiki_00.gz", "wiki_01.gz", "wiki_02.gz")
SEQ = (128, 512)


def _args(shared: Path, out: Path, *extra: str) -> list[str]:
    return [*(str(shared / "wikipedia" / f) for f in FILES),
            "--vocab", str(shared / "vocab" / "bert-base-uncased-vocab.txt"), "--out", str(out),
            "--seq-len", *map(str, SEQ), "--samples-per-shard", "1000", "--progress", "log", *extra]


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bertscale")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


def _same_tree(a: Path, b: Path) -> None:
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if ".work" not in p.parts)
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if ".work" not in p.parts)
    assert names_a == names_b
    for n in names_a:
        if (a / n).is_file():
            assert filecmp.cmp(a / n, b / n, shallow=False), f"{n} differs"


@pytest.fixture(scope="module")
def reference(shared_data: Path, tmp_path_factory) -> Path:
    """One process, both sequence lengths, spools kept for the resume test."""
    out = tmp_path_factory.mktemp("prep") / "ref"
    assert _run_cli(_args(shared_data, out, "--keep-work")) == 0
    return out


def _mpirun() -> str | None:
    found = shutil.which("mpirun")
    if found:
        return found
    venv = Path(sys.executable).parent / "mpiexec"
    return str(venv) if venv.exists() else None


@pytest.mark.slow
def test_same_shards_with_2_processes_and_mpirun(shared_data: Path, reference: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "bertscale.commands.prepare",
                    *_args(shared_data, two, "--workers", "2")], check=True, env=env)
    _same_tree(reference, two)

    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun / mpiexec on this machine")
    mpi = tmp_path / "mpi"
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
                           "--mca", "oob_tcp_if_include", "lo", "-np", "2",
                           sys.executable, "-m", "bertscale.commands.prepare", *_args(shared_data, mpi)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks worked (each reports its own share) and the result is the same shards.
    assert "[rank 0]" in proc.stderr and "[rank 1]" in proc.stderr
    _same_tree(reference, mpi)
    assert not list(mpi.glob(".mpi-start-*"))          # the ranks' meeting folder is gone


def test_mpi_ranks_that_do_not_share_the_output_folder_stop_at_start(shared_data: Path, tmp_path: Path) -> None:
    """Before its first MPI message each rank waits for a file from every other rank in --out
    (MPIContext.wait_for_all_ranks: Open MPI 4.1 can crash a rank still inside MPI_Init when a
    message arrives early). Here `bertscale prepare` runs as two ranks in different working
    folders with a relative --out, as on two nodes whose --out is node-local: each rank waits
    --start-timeout, then stops with one line naming the rank it never saw and its folder,
    before any work (no shards, no traceback)."""
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun / mpiexec on this machine")
    nodes = [tmp_path / "node_a", tmp_path / "node_b"]
    for n in nodes:
        n.mkdir()
    bertscale = str(Path(sys.executable).with_name("bertscale"))
    args = [bertscale, "prepare", str(shared_data / "wikipedia" / FILES[0]),
            "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"), "--out", "shards",
            "--seq-len", "64", "--start-timeout", "3", "--progress", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
                           "--mca", "oob_tcp_if_include", "lo",
                           "-np", "1", "-wdir", str(nodes[0]), *args, ":",
                           "-np", "1", "-wdir", str(nodes[1]), *args],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    for node, other in [(nodes[0], 1), (nodes[1], 0)]:
        assert (f"rank(s) {other} of 2 did not appear in {node / 'shards'}/.mpi-start-"
                in proc.stderr), proc.stderr[-3000:]
        assert not (node / "shards" / "seq64").exists()
    assert "Traceback" not in proc.stderr


def test_manifest_describes_the_shards(shared_data: Path, reference: Path) -> None:
    vocab_src = shared_data / "vocab" / "bert-base-uncased-vocab.txt"
    for L in SEQ:
        m = read_manifest(reference / f"seq{L}")
        assert (m.seq_len, m.pair_objective, m.seed, m.lowercase, m.token_dtype) == (L, "nsp", 12345, True, "uint16")
        assert m.vocab_file.read_bytes() == vocab_src.read_bytes()
        assert m.tokenizer_hash == vocab_hash(vocab_src, True)
        assert [i["sha256"] for i in m.settings["inputs"]] == [sha256_file(shared_data / "wikipedia" / f) for f in FILES]
        for split in ("train", "eval"):
            infos = m.shards[split]
            assert infos, split
            assert [s.name for s in infos] == [f"{split}-{k:06d}.tar" for k in range(len(infos))]
            assert all(s.samples == 1000 for s in infos[:-1]) and 0 < infos[-1].samples <= 1000
            labels = 0
            for k, info in enumerate(infos):
                path = m.path.parent / info.name
                assert path.stat().st_size == info.bytes
                assert sha256_file(path) == info.sha256
                with tarfile.open(path) as tar:  # a standard tar, members in order
                    members = tar.getmembers()
                    assert [x.name for x in members] == [member_name(split, k, i) for i in range(info.samples)]
                    for x in members:
                        _, _, label = decode_sample(tar.extractfile(x).read())
                        labels += label == 1
            assert m.num_samples(split) == m.stats[split]["samples"]
            assert labels == m.stats[split]["label_1"]
        # the held-out split is about eval_fraction (1%) of the documents
        share = m.num_samples("eval") / (m.num_samples("eval") + m.num_samples("train"))
        assert 0.002 < share < 0.03


def _samples(manifest_dir: Path, split: str = "train"):
    m = read_manifest(manifest_dir)
    for info in m.shards[split]:
        with tarfile.open(m.path.parent / info.name) as tar:
            for x in tar.getmembers():
                yield decode_sample(tar.extractfile(x).read())


def _within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_sample_statistics(reference: Path) -> None:
    for L in SEQ:
        m = read_manifest(reference / f"seq{L}")
        n = single = labels = full = 0
        for ids, a_len, label in _samples(reference / f"seq{L}"):
            n += 1
            assert len(ids) <= L and ids[0] == 101 and ids[a_len - 1] == 102 and ids[-1] == 102
            assert 2 < a_len < len(ids) - 1 and np.count_nonzero(ids == 102) == 2
            labels += label
            full += len(ids) == L
        st = m.stats["train"]
        assert st["samples"] == n and st["label_1"] == labels
        single = st["single_segment"]
        # Random next in half of the chunks with a true continuation (always for a single
        # sentence chunk, as Google's script): observed rate ~50% among those.
        assert _within(labels - single, n - single, 0.5)
        # short targets ~ short_seq_prob (randint(2, max) hits max with prob 1/(max-1))
        assert _within(st["short_target"], n, 0.1 * (1 - 1 / (L - 4)))
        # most sequences are filled to the brim at 128 (Wikipedia documents are long enough)
        if L == 128:
            assert full / n > 0.5


def test_webdataset_reads_the_shards(reference: Path) -> None:
    import webdataset as wds

    m = read_manifest(reference / "seq128")
    path = m.path.parent / m.shards["train"][1].name
    got = [(s["__key__"], decode_sample(s["sample"])) for s in wds.WebDataset(str(path), shardshuffle=False)]
    with tarfile.open(path) as tar:
        want = [(x.name.split(".")[0], decode_sample(tar.extractfile(x).read())) for x in tar.getmembers()]
    assert len(got) == len(want) == 1000
    for (k1, (i1, a1, l1)), (k2, (i2, a2, l2)) in zip(got, want):
        assert k1 == k2 and a1 == a2 and l1 == l2 and np.array_equal(i1, i2)


@pytest.mark.slow
def test_resume_after_a_crash(shared_data: Path, reference: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "crash"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "bertscale.commands.prepare", *_args(shared_data, out)],
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / ".work" / "units").glob("u*/done.json")) and time.time() < deadline:
        assert proc.poll() is None, "prepare ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    proc.wait()
    done = len(list((out / ".work" / "units").glob("u*/done.json")))
    assert 1 <= done < len(FILES)
    assert not (out / "seq128" / "manifest.json").exists()
    capfd.readouterr()
    assert _run_cli(_args(shared_data, out)) == 0
    err = capfd.readouterr().err
    assert f"resuming, {done} of {len(FILES)} units already done" in err
    assert not list(out.rglob("*.tmp*"))
    _same_tree(reference, out)

    # Completed shards are kept, a lost one is rewritten; a finished run is a no-op.
    part = tmp_path / "part"
    shutil.copytree(reference, part)
    lost = part / "seq512" / "train-000001.tar"
    lost.unlink()
    (part / ".work" / "shards" / "seq512-train-000001.tar.json").unlink()
    (part / "seq128" / "manifest.json").unlink()
    kept = part / "seq128" / "train-000002.tar"
    os.utime(kept, (0, 0))
    assert _run_cli(_args(shared_data, part)) == 0
    assert kept.stat().st_mtime == 0  # not rewritten
    _same_tree(reference, part)
    capfd.readouterr()
    assert _run_cli(_args(shared_data, part)) == 0
    assert "already complete" in capfd.readouterr().err


def test_other_settings_into_the_same_folder_are_refused(shared_data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".work"))
    with pytest.raises(UserError, match="exists from a run with other settings"):
        _run_cli(_args(shared_data, out, "--seed", "7"))


def _write_inputs(shared: Path, folder: Path) -> None:
    """Real Wikipedia text in two other formats and compressions."""
    import bz2
    import lzma

    from bertscale.data.text import read_documents

    docs = [d for d in read_documents(shared / "wikipedia" / "wiki_03.gz") if len(d) > 1]
    folder.mkdir()
    half = len(docs) // 2
    (folder / "a.jsonl.xz").write_bytes(lzma.compress("".join(
        json.dumps({"text": "\n".join(d)}) + "\n" for d in docs[:half]).encode()))
    (folder / "b.txt.bz2").write_bytes(bz2.compress(
        "\n\n".join("\n".join(d) for d in docs[half:]).encode()))


def test_train_vocab_objectives_and_formats(shared_data: Path, tmp_path: Path, capfd) -> None:
    _write_inputs(shared_data, tmp_path / "in")
    outs = []
    for name, progress in (("one", "log"), ("two", "none")):
        out = tmp_path / name
        assert _run_cli([str(tmp_path / "in" / "*"), "--train-vocab", "3000", "--out", str(out),
                         "--objective", "sop", "--samples-per-shard", "500", "--progress", progress]) == 0
        outs.append(out)
        if progress == "log":   # vocabulary training reports its two passes over the 2 files
            err = capfd.readouterr().err
            assert "two reading passes over 2 files" in err and "vocabulary: trained: 4/4 done" in err
    # Training twice gives the same vocabulary and therefore the same shards.
    _same_tree(outs[0], outs[1])
    m = read_manifest(outs[0] / "seq128")
    assert m.vocab_size == 3000 and m.lowercase and m.pair_objective == "sop"
    assert m.tokenizer_hash == vocab_hash(outs[0] / "vocab.txt", True)
    assert m.vocab_file.read_bytes() == (outs[0] / "vocab.txt").read_bytes()
    assert [Path(i["path"]).name for i in m.settings["inputs"]] == ["a.jsonl.xz", "b.txt.bz2"]
    labels = [label for _, _, label in _samples(outs[0] / "seq128")]
    assert _within(sum(labels), len(labels), 0.5)  # swapped half of the time

    mlm = tmp_path / "mlm"
    assert _run_cli([str(tmp_path / "in"), "--vocab", str(outs[0] / "vocab.txt"), "--out", str(mlm),
                     "--objective", "mlm", "--progress", "none"]) == 0
    lengths = []
    for ids, a_len, label in _samples(mlm / "seq128"):
        assert label == -1 and a_len == len(ids) and ids[0] == 2 and ids[-1] == 3
        lengths.append(len(ids))
    assert np.mean(np.array(lengths) == 128) > 0.8  # packed: nearly all full


def test_bad_arguments(shared_data: Path, tmp_path: Path) -> None:
    vocab = str(shared_data / "vocab" / "bert-base-uncased-vocab.txt")
    with pytest.raises(UserError, match="matches no files"):
        _run_cli([str(tmp_path / "*.txt"), "--vocab", vocab, "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--seq-len"):
        run_prepare(PrepareConfig(inputs=["x"], out=tmp_path, vocab=Path(vocab), seq_lens=[4]))
    with pytest.raises(SystemExit):  # argparse: --vocab and --train-vocab exclude each other
        _run_cli(["x", "--vocab", vocab, "--train-vocab", "100", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="vocabulary file not found"):
        src = tmp_path / "t.txt"
        src.write_text("One sentence. Another one.\n")
        _run_cli([str(src), "--vocab", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")])


def test_progress_output(capsys) -> None:
    log = Progress("log", total_units=3, prefix="[rank 1] ", every=0.0)
    log.update(2_000_000, 500, units=1)
    err = capsys.readouterr().err
    assert err.startswith("[rank 1] 1/3 done") and "MB/s" in err and "/s)" in err and "\r" not in err
    assert re.search(r"ETA \d+:\d\d$", err.strip()), err     # 2 units left at the same pace
    log.update(units=2)
    assert "ETA" not in capsys.readouterr().err                # nothing left to wait for
    bar = Progress("bar", total_units=3)
    bar.last = 0.0
    bar.update(1_000_000, 10)
    assert capsys.readouterr().err.startswith("\r")


def test_every_flag_has_help_and_says_its_default() -> None:
    """`bertscale prepare --help` (the parser the command builds): every flag explains itself and
    names its default; the dupe factor names the references' values."""
    parser = argparse.ArgumentParser(prog="bertscale")
    p = register(parser.add_subparsers(dest="command"))
    for action in p._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        if action.default not in (None, False, True, argparse.SUPPRESS):
            assert "default" in action.help, f"{action.option_strings[0]}: help names no default"
    dupe = next(a for a in p._actions if "--dupe-factor" in a.option_strings)
    assert "default: 1" in dupe.help and "10" in dupe.help and "NVIDIA" in dupe.help
