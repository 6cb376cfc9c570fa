"""The pretraining loader on shards prepared from real Wikipedia: masking statistics, the exact
world-size-independent position (resume 1→2, 2→1, 2→3 ranks, other worker counts), eval
padding, bad shards, remote shards.

Ranks are built in-process (a PretrainLoader per rank): the loader needs no process group,
so this is exactly what each rank of a job computes. Statistical bounds are 4.5 binomial
standard deviations (see test_text.py).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale.commands.prepare import register
from bertscale.data.cache import FetchSettings
from bertscale.data.loader import LoaderConfig, MaskingConfig, PretrainLoader, open_loader
from bertscale.data.order import GlobalOrder
from bertscale.data.shards import decode_sample, read_manifest
from bertscale.errors import UserError
from bertscale.tokenizer import read_vocab

CLS, SEP, PAD, MASK = 101, 102, 0, 103


@pytest.fixture(scope="module")
def data(shared_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loader")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "prepare", str(shared_data / "wikipedia" / "wiki_04.gz"), str(shared_data / "wikipedia" / "wiki_05.gz"),
        "--vocab", str(shared_data / "vocab" / "bert-base-uncased-vocab.txt"), "--out", str(out),
        "--samples-per-shard", "500", "--eval-fraction", "0.05", "--progress", "none"])
    assert args.func(args) == 0
    return out / "seq128"


@pytest.fixture(scope="module")
def originals(data: Path) -> dict[tuple[str, int], tuple[np.ndarray, int, int]]:
    """Every stored sample, read with tarfile: (split, sample_id) -> (ids, a_len, label)."""
    m = read_manifest(data)
    out = {}
    for split, base in (("train", 0), ("eval", 1 << 62)):
        for k, info in enumerate(m.shards[split]):
            with tarfile.open(data / info.name) as tar:
                for i, x in enumerate(tar.getmembers()):
                    out[(split, base + (k << 32) + i)] = decode_sample(tar.extractfile(x).read())
    return out


def _loader(data, cache_dir=None, **kw) -> PretrainLoader:
    args = dict(split="train", global_batch_size=24, micro_batch_size=4, rank=0, world_size=1, seed=5)
    args.update(kw)
    if cache_dir is not None:  # the node cache of shards in an object store
        args["fetch"] = FetchSettings(cache_dir=cache_dir)
    return open_loader(data, LoaderConfig(**args))


def _within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _take(loader: PretrainLoader, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------------------------
# masking

def test_masking_statistics(data: Path, originals) -> None:
    loader = _loader(data, global_batch_size=256, micro_batch_size=64)
    vocab_size = len(read_vocab(loader.manifest.vocab_file))
    counts = Counter()
    per_position = np.zeros(128, dtype=np.int64)
    full_rows = 0
    for batch in _take(loader, 70):
        ids, pos, labels = batch["input_ids"].numpy(), batch["masked_positions"].numpy(), batch["masked_labels"].numpy()
        lengths = batch["attention_mask"].numpy().sum(1)
        for b, sid in enumerate(batch["sample_ids"].tolist()):
            orig, a_len, label = originals[("train", sid)]
            L = len(orig)
            assert lengths[b] == L and batch["next_sentence_label"][b] == label
            assert np.array_equal(batch["token_type_ids"][b, :L].numpy(), (np.arange(L) >= a_len).astype(np.int64))
            valid = labels[b] != -100
            n = int(valid.sum())
            # exactly Google's count: min(max_predictions, max(1, round(L * 0.15)))
            assert n == min(20, max(1, round(L * 0.15))) == min(20, max(1, int(np.rint(L * 0.15))))
            p = pos[b, :n]
            assert np.all(np.diff(p) > 0) and np.all(pos[b, n:] == 0) and np.all(labels[b, n:] == -100)
            assert np.array_equal(labels[b, :n], orig[p])           # labels are the original tokens
            assert not np.isin(orig[p], [CLS, SEP, PAD]).any()      # never a special token
            untouched = np.ones(128, dtype=bool)
            untouched[p] = False
            padded = np.zeros(128, dtype=np.int64)
            padded[:L] = orig
            assert np.array_equal(ids[b][untouched], padded[untouched])
            new = ids[b, p]
            counts["mask"] += int((new == MASK).sum())
            counts["keep"] += int((new == orig[p]).sum())
            rnd = (new != MASK) & (new != orig[p])
            counts["random"] += int(rnd.sum())
            assert not np.isin(new[rnd], [0, 100, CLS, SEP, MASK]).any()
            counts["n"] += n
            counts["tokens"] += L
            if L == 128:
                full_rows += 1
                per_position[p] += 1
    n = counts["n"]
    assert n > 60_000
    V = vocab_size - 5  # random replacements exclude the five special tokens
    assert _within(counts["mask"], n, 0.8)
    assert _within(counts["random"], n, 0.1 * (1 - 1 / V))
    assert _within(counts["keep"], n, 0.1 + 0.1 / V)
    assert abs(n / counts["tokens"] - 0.15) < 0.005
    # Uniform choice among the 125 candidates of a full pair (positions other than the 3
    # specials): every position's rate is 19/125 within bounds (Bonferroni over 125 tests).
    a_positions = per_position[1:]
    rate = 19 / 125
    nonzero = a_positions[a_positions > 0]
    assert len(nonzero) >= 120
    sd = math.sqrt(rate * (1 - rate) / full_rows)
    assert np.all(np.abs(nonzero / full_rows - rate) < 5.5 * sd)


def test_whole_word_masking(data: Path, originals) -> None:
    loader = _loader(data, global_batch_size=128, micro_batch_size=64,
                     masking=MaskingConfig(whole_word=True))
    pieces = np.zeros(30522, dtype=bool)
    for tok, i in read_vocab(loader.manifest.vocab_file).items():
        pieces[i] = tok.startswith("##")
    words_masked = 0
    multi_piece = 0
    for batch in _take(loader, 20):
        for b, sid in enumerate(batch["sample_ids"].tolist()):
            orig, _, _ = originals[("train", sid)]
            n = int((batch["masked_labels"][b] != -100).sum())
            assert 1 <= n <= min(20, max(1, round(len(orig) * 0.15)))
            masked = set(batch["masked_positions"][b, :n].tolist())
            special = np.isin(orig, [CLS, SEP])
            assert not any(special[p] for p in masked)
            # Every word touched is masked whole: its start and all its "##" pieces.
            for p in masked:
                s = p
                while pieces[orig[s]] and not special[s - 1]:
                    s -= 1
                e = p + 1
                while e < len(orig) and pieces[orig[e]] and not special[e]:
                    e += 1
                assert set(range(s, e)) <= masked, (s, e, masked)
                if s == p:
                    words_masked += 1
                    multi_piece += e - s > 1
    assert words_masked > 1000 and multi_piece > 50  # the rule was exercised on real pieces


# ---------------------------------------------------------------------------------------------
# the exact, world-size-independent position

def _global_batches(data: Path, world: int, workers: int, consumed: int, count: int,
                    G: int = 24, m: int = 4) -> list[dict[str, torch.Tensor]]:
    """Run `world` ranks from `consumed` for `count` global batches; rebuild each global batch
    by concatenating the ranks' micro-batches in rank order."""
    per_rank = G // (m * world)
    outs = []
    for r in range(world):
        loader = _loader(data, rank=r, world_size=world, num_workers=workers,
                         consumed_samples=consumed, global_batch_size=G, micro_batch_size=m)
        outs.append(_take(loader, count * per_rank))
        assert loader.consumed_samples == consumed + count * G  # the trainer's counter
    batches = []
    for b in range(count):
        parts = [mb for r in range(world) for mb in outs[r][b * per_rank:(b + 1) * per_rank]]
        batches.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return batches


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.slow
def test_resume_with_other_world_sizes_and_workers(data: Path) -> None:
    """Consume k global batches with W ranks × N workers (micro-batch m), resume with W' × N'
    (and another m, as gradient accumulation is recomputed): the same global batches."""
    total, k = 10, 4
    straight = _global_batches(data, world=1, workers=0, consumed=0, count=total, m=8)
    ids = torch.cat([b["sample_ids"] for b in straight]).tolist()
    assert len(set(ids)) == len(ids) == total * 24
    for (w1, n1, m1), (w2, n2, m2) in [((1, 0, 4), (2, 0, 6)), ((2, 0, 2), (1, 2, 8)),
                                       ((2, 2, 4), (3, 0, 4)), ((3, 1, 2), (1, 0, 3))]:
        before = _global_batches(data, world=w1, workers=n1, consumed=0, count=k, m=m1)
        after = _global_batches(data, world=w2, workers=n2, consumed=k * 24, count=total - k, m=m2)
        seen = torch.cat([b["sample_ids"] for b in before + after]).tolist()
        assert Counter(seen) == Counter(ids), (w1, w2)   # nothing repeated or skipped
        _same(before + after, straight)                  # identical batches, masks included


def test_epochs_wrap_and_reshuffle(data: Path) -> None:
    m = read_manifest(data)
    counts = [s.samples for s in m.shards["train"]]
    N = sum(counts)
    order = GlobalOrder(counts, seed=5, shuffle=True, window=1000)
    shard, offset = order.locate(np.arange(2 * N, dtype=np.int64))
    keys = shard * (1 << 32) + offset
    epoch0, epoch1 = keys[:N], keys[N:]
    everything = sorted((k << 32) + i for k, c in enumerate(counts) for i in range(c))
    assert sorted(epoch0.tolist()) == everything == sorted(epoch1.tolist())  # each epoch: all, once
    assert not np.array_equal(epoch0, epoch1)                                # reshuffled
    assert np.mean(np.diff(offset[:N]) == 1) < 0.05                           # shuffled within windows
    # Crossing the epoch boundary with 2 ranks gives what 1 rank gives.
    start = N - 36
    _same(_global_batches(data, world=2, workers=0, consumed=start, count=3),
          _global_batches(data, world=1, workers=0, consumed=start, count=3))


def test_eval_is_one_padded_pass_with_equal_batches_per_rank(data: Path, originals) -> None:
    m = read_manifest(data)
    N = m.num_samples("eval")
    G = 12
    assert N % G != 0
    seen = []
    lengths = set()
    for r in range(3):
        loader = _loader(data, split="eval", rank=r, world_size=3, global_batch_size=G, micro_batch_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(N / G) * 2  # same on every rank
        lengths.add(len(batches))
        for batch in batches:
            for b, sid in enumerate(batch["sample_ids"].tolist()):
                labels = batch["masked_labels"][b]
                if sid == -1:  # filler past the end: ignored by every loss
                    assert batch["attention_mask"][b].sum() == 2
                    assert (labels == -100).all() and batch["next_sentence_label"][b] == -100
                    continue
                seen.append(sid)
                n = int((labels != -100).sum())
                orig = originals[("eval", sid)][0]
                assert np.array_equal(labels[:n].numpy(), orig[batch["masked_positions"][b, :n].numpy()])
    assert len(lengths) == 1
    assert sorted(seen) == sorted(k[1] for k in originals if k[0] == "eval")  # every sample once


# ---------------------------------------------------------------------------------------------
# bad data

def _copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _one_epoch(loader: PretrainLoader) -> list[dict[str, torch.Tensor]]:
    """Whole global batches covering every position of epoch 0 (and a few of epoch 1)."""
    n = math.ceil(loader.n / loader.G) * loader.micro_per_batch
    return _take(loader, n)


def _reads_of(loader: PretrainLoader, shard: int, offsets: set[int], batches: list) -> int:
    """How many of the positions the batches covered map to these samples (epoch 1 included)."""
    positions = np.arange(sum(len(b["sample_ids"]) for b in batches), dtype=np.int64)
    s, o = loader.order.locate(positions)
    return sum(1 for a, b in zip(s.tolist(), o.tolist()) if a == shard and b in offsets)


def test_corrupt_byte(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path / "d")
    shard = d / "train-000003.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[17]
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data + 20] ^= 0x01  # a token id in sample 17
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"train-000003\.tar.*sha256"):
        _loader(d)  # refused at start
    with pytest.raises(UserError, match=r"shard train-000003\.tar .*sample 17 .*checksum mismatch"):
        _one_epoch(_loader(d, verify_sha256=False, global_batch_size=500, micro_batch_size=100))
    loader = _loader(d, verify_sha256=False, bad_sample_policy="skip", global_batch_size=500, micro_batch_size=100)
    batches = _one_epoch(loader)
    ids = torch.cat([b["sample_ids"] for b in batches])
    assert loader.bad_samples == int((ids == -2).sum()) == _reads_of(loader, 3, {17}, batches) >= 1
    assert (3 << 32) + 17 not in ids.tolist()

    # a damaged tar header (its mtime field): tar would refuse it, so does the loader
    d2 = _copy(data, tmp_path / "d2")
    shard = d2 / "train-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[5]
    raw = bytearray(shard.read_bytes())
    raw[member.offset + 140] ^= 0x02
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"shard train-000001\.tar .*sample 5 .*header checksum"):
        _one_epoch(_loader(d2, verify_sha256=False, global_batch_size=500, micro_batch_size=100))
    loader = _loader(d2, verify_sha256=False, bad_sample_policy="skip", global_batch_size=500, micro_batch_size=100)
    batches = _one_epoch(loader)
    assert loader.bad_samples == _reads_of(loader, 1, {5}, batches) >= 1


def test_truncated_shard(data: Path, tmp_path: Path) -> None:
    d = _copy(data, tmp_path / "d")
    shard = d / "train-000002.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = int(shard.stat().st_size * 0.6) + 100
    lost = {i for i, x in enumerate(members) if x.offset_data + x.size > cut}
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(UserError, match=r"train-000002\.tar .*bytes.*truncated"):
        _loader(d)
    with pytest.raises(UserError, match=r"shard train-000002\.tar .*sample \d+ .*(truncated|missing)"):
        _one_epoch(_loader(d, verify_sha256=False, global_batch_size=500, micro_batch_size=100))
    loader = _loader(d, verify_sha256=False, bad_sample_policy="skip", max_bad_samples=1000,
                     global_batch_size=500, micro_batch_size=100, num_workers=2)
    batches = _one_epoch(loader)
    assert loader.bad_samples == _reads_of(loader, 2, lost, batches) >= len(lost) > 100
    assert sum(len(b["sample_ids"]) for b in batches) >= loader.n  # positions kept: full batches
    with pytest.raises(UserError, match="more than max_bad_samples=10"):
        _one_epoch(_loader(d, verify_sha256=False, bad_sample_policy="skip", max_bad_samples=10,
                           global_batch_size=500, micro_batch_size=100))


def test_remote_shards_through_pipe(data: Path, tmp_path: Path) -> None:
    m = read_manifest(data, shard_base=f"pipe:cat {data}/{{name}}")
    assert m.fingerprint == read_manifest(data).fingerprint  # same data wherever it is stored
    remote = _take(_loader(m, cache_dir=tmp_path / "cache"), 12)
    _same(remote, _take(_loader(data), 12))
    assert len(list((tmp_path / "cache").rglob("train-*.tar"))) >= 1
    bad = _copy(data, tmp_path / "bad")
    raw = bytearray((bad / "train-000000.tar").read_bytes())
    raw[2000] ^= 0xFF
    (bad / "train-000000.tar").write_bytes(bytes(raw))
    m_bad = read_manifest(data, shard_base=f"pipe:cat {bad}/{{name}}")
    with pytest.raises(UserError, match=r"train-000000\.tar fetched from pipe:cat .*sha256"):
        _one_epoch(_loader(m_bad, cache_dir=tmp_path / "cache2", global_batch_size=500,
                           micro_batch_size=100))


def test_configuration_errors(data: Path) -> None:
    with pytest.raises(UserError, match=r"global batch 30 is not divisible by micro-batch 4 × 2 ranks"):
        _loader(data, global_batch_size=30, micro_batch_size=4, world_size=2)
    with pytest.raises(UserError, match="rank 3 is outside world size 2"):
        _loader(data, rank=3, world_size=2)
    with pytest.raises(UserError, match="no split 'test'"):
        _loader(data, split="test")
    with pytest.raises(UserError, match="bad_sample_policy"):
        _loader(data, bad_sample_policy="ignore")
    with pytest.raises(UserError, match="manifest not found"):
        _loader(data.parent / "nowhere")


def _fixed_samples(dtype: str) -> list[tuple[np.ndarray, int, int]]:
    out = []
    for off in range(37):
        n = 3 + (off * 37) % 290                       # 3..292 ids: every payload padding
        ids = (np.arange(n) * 7919 + off * 104729) % 70000 % (65536 if dtype == "<u2" else 70000)
        out.append((ids.astype(dtype), 1 + off % n, off % 3 - 1))
    return out


@pytest.mark.parametrize("dtype, size, sha256", [
    ("<u2", 40960, "93ec12d251eaeeb7135c16cf63c244e32fefebe4c51d93ba5fbc07e0869b2776"),
    ("<u4", 51200, "f95f12617775256e1471b29158c3ab1b42a74f3379029431cdde519eb5e2c331")])
def test_shard_bytes_are_those_of_the_hand_written_writer(tmp_path: Path, dtype, size, sha256) -> None:
    """The shard format is frozen: the writer (tar headers from `tarfile.TarInfo.tobuf` since
    issue 15) gives, for fixed samples, the bytes the earlier hand-written header code gave
    (the sha256 and size below were taken from it), so corpora prepared before stay valid and
    their manifests keep their fingerprints. A library call: `prepare` cannot be given fixed
    samples. tarfile reads the shard back, and every sample decodes to what was written."""
    from bertscale.data.shards import TarWriter, encode_sample, member_name

    samples = _fixed_samples(dtype)
    path = tmp_path / "eval-000007.tar"
    w = TarWriter(path)
    for off, (ids, a_len, label) in enumerate(samples):
        w.add(member_name("eval", 7, off), encode_sample(ids, a_len, label))
    assert w.close() == (size, sha256)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [member_name("eval", 7, i) for i in range(37)]
        assert all((m.mode, m.uid, m.gid, m.mtime, m.uname) == (0o644, 0, 0, 0, "") for m in members)
        for m, (ids, a_len, label) in zip(members, samples):
            got_ids, got_a, got_label = decode_sample(tar.extractfile(m).read())
            assert np.array_equal(got_ids, ids) and (got_a, got_label) == (a_len, label)
