"""`bertscale.data.wds.shard_pipeline`: our shards through a `webdataset` pipeline yield, for every
key of a whole epoch, exactly what the trainer's loader (bertscale.data.loader) decodes and masks
for that sample in that epoch: the same token ids, segments, pair label, masked positions and
labels, drawn for the same global stream position. Real shards prepared from Wikipedia; the
loader is the reference (this is a library for other training loops, so the library is what the
test calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertscale.data.loader import LoaderConfig, open_loader
from bertscale.data.masking import MaskingConfig
from bertscale.data.shards import read_manifest
from bertscale.data.wds import ShardPipeline, shard_pipeline
from bertscale.errors import UserError
from pretrain_runs import manifest  # noqa: F401
from stores import KINDS

SEED = 1234
MASKING = MaskingConfig(max_predictions_per_seq=20)


def _loader_samples(m, split: str, first: int, count: int) -> dict[str, dict]:
    """Positions [first, first + count) as the trainer's loader reads and masks them, by key."""
    G = 128
    loader = open_loader(m, LoaderConfig(
        split=split, global_batch_size=G, micro_batch_size=G, rank=0, world_size=1, seed=SEED,
        masking=MASKING, verify_sha256=False, consumed_samples=first - first % G))
    out: dict[str, dict] = {}
    k = 0
    while len(out) < count:
        positions = loader.positions(k)
        b = loader.make_batch(positions)
        k += 1
        for i, p in enumerate(positions.tolist()):
            if not first <= p < first + count:
                continue
            sid = int(b["sample_ids"][i])
            assert sid >= 0
            shard, offset = (sid & ((1 << 62) - 1)) >> 32, sid & 0xFFFFFFFF
            n = int(b["attention_mask"][i].sum())
            out[f"{split}-{shard:06d}-{offset:06d}"] = dict(
                position=p, n=n, input_ids=b["input_ids"][i, :n].numpy(),
                token_type_ids=b["token_type_ids"][i, :n].numpy(),
                masked_positions=b["masked_positions"][i].numpy(),
                masked_labels=b["masked_labels"][i].numpy(),
                next_sentence_label=int(b["next_sentence_label"][i]))
    return out


def _check(pipeline: ShardPipeline, want: dict[str, dict]) -> None:
    got = {s["__key__"]: s for s in pipeline}
    assert got.keys() == want.keys()        # every sample of the epoch once, no other
    for key, w in want.items():
        s = got[key]
        assert s["position"] == w["position"], key
        for field in ("input_ids", "token_type_ids", "masked_positions", "masked_labels"):
            assert np.array_equal(s[field], w[field]), (key, field)
        assert s["next_sentence_label"] == w["next_sentence_label"], key
        # unmasked: putting the labels back gives the stored ids
        ids = s["input_ids"].copy()
        keep = s["masked_labels"] >= 0
        ids[s["masked_positions"][keep]] = s["masked_labels"][keep]
        assert np.array_equal(ids, w["plain"]), key


@pytest.mark.slow
def test_pipeline_yields_what_the_loader_decodes_over_whole_epochs(manifest) -> None:
    m = read_manifest(manifest)
    for split, epochs in (("eval", [0]), ("train", [0, 1])):
        n = m.num_samples(split)
        plain = {s["__key__"]: s for s in shard_pipeline(m, split)}
        assert len(plain) == n > 200
        for epoch in epochs:
            want = _loader_samples(m, split, epoch * n, n)
            for key, w in want.items():
                w["plain"] = plain[key]["input_ids"]
                assert plain[key]["input_ids"].dtype == np.int64
            _check(shard_pipeline(m, split, mask=True, masking=MASKING, epoch=epoch, seed=SEED),
                   want)
    # A DataLoader with workers deals the shards over them: still every eval sample once.
    keys = [s["__key__"] for s in torch.utils.data.DataLoader(
        shard_pipeline(m, "eval"), batch_size=None, num_workers=2)]
    assert sorted(keys) == sorted(plain_key for plain_key in
                                  (s["__key__"] for s in shard_pipeline(m, "eval")))
    # webdataset's fluid methods work on it
    batch = next(iter(shard_pipeline(m, "eval").batched(4, collation_fn=list)))
    assert len(batch) == 4


def test_a_damaged_sample_names_the_shard(manifest, tmp_path) -> None:
    import shutil

    m = read_manifest(manifest)
    folder = tmp_path / "copy"
    shutil.copytree(manifest.parent, folder)
    shard = folder / m.shards["eval"][0].name
    data = bytearray(shard.read_bytes())
    data[512 + 40] ^= 0xFF           # a token id of the first sample
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"eval-000000\.tar: sample eval-000000-000000: checksum "
                                        r"mismatch"):
        list(shard_pipeline(folder / "manifest.json", "eval"))


@pytest.mark.parametrize("store", KINDS, indirect=True)
def test_shards_in_an_object_store(store, manifest, tmp_path) -> None:
    """The manifest and shards uploaded to each object store (moto's S3, gcp-storage-emulator,
    Azurite on 127.0.0.1; tests/stores.py) read through the store URL: the same samples as the
    local copy."""
    from bertscale.data.prepare import upload_prepared

    url = upload_prepared(manifest, store.url("seq128"), verbose=False)
    m = read_manifest(url, cache_dir=tmp_path / "cache")
    assert m.shard_location("eval", 0).startswith(store.url("seq128/"))
    remote = {s["__key__"]: s for s in shard_pipeline(m, "eval")}
    local = {s["__key__"]: s for s in shard_pipeline(manifest, "eval")}
    assert remote.keys() == local.keys()
    for key in local:
        assert np.array_equal(remote[key]["input_ids"], local[key]["input_ids"])
        assert remote[key]["__url__"].startswith(store.url("seq128/eval-"))


def test_shards_behind_a_pipe_command(manifest, tmp_path) -> None:
    """Shard locations of `pipe:COMMAND` (WebDataset's convention, which the trainer's loader
    reads too): the same samples as the local copy, and a command that fails is one error naming
    the shard. Failed before the fix with an AttributeError: the pipeline closed every shard's
    stream, and the pipe reader had no `close` (mypy found it)."""
    local = {s["__key__"]: s for s in shard_pipeline(manifest, "eval")}
    m = read_manifest(manifest, shard_base=f"pipe:cat {manifest.parent}/{{name}}")
    assert m.shard_location("eval", 0).startswith("pipe:cat ")
    piped = {s["__key__"]: s for s in shard_pipeline(m, "eval")}
    assert piped.keys() == local.keys()
    for key in local:
        assert np.array_equal(piped[key]["input_ids"], local[key]["input_ids"])
    # A command that writes the whole shard and then fails (a copy tool that reports an error
    # at the end): its status is the error, not a silent success.
    failing = read_manifest(manifest, shard_base=f"pipe:cat {manifest.parent}/{{name}}; exit 3")
    with pytest.raises(UserError, match=r"shard pipe:cat .*eval-000000\.tar; exit 3: .*exited "
                                        r"with status 3"):
        list(shard_pipeline(failing, "eval"))
