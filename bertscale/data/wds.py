"""bertscale's shards as a `webdataset` pipeline, for training loops other than ours.

    from bertscale.data.wds import shard_pipeline
    dataset = shard_pipeline("data/seq128/manifest.json", split="train", mask=True, epoch=0)
    loader = torch.utils.data.DataLoader(dataset.batched(32, collation_fn=my_collate),
                                         batch_size=None, num_workers=4)

Plain `webdataset.WebDataset(url)` reads our shards (they are ordinary tars), but yields each
sample as one opaque ``.sample`` blob in our compact format (bertscale.data.shards: a header
with a CRC-32, then the token ids). `shard_pipeline` builds the webdataset pipeline from
webdataset's own stages (shard list, split by node and by DataLoader worker, tar expansion,
grouping by key), opens local shards and store URLs (``s3://``, ``gs://``, ``az://``,
``http(s)://``, through bertscale.data.remote, with the store's extra installed), and decodes
each sample into arrays:

- ``input_ids`` (int64, the sample's n tokens: [CLS] A [SEP] B [SEP], unpadded),
  ``token_type_ids`` (int64, 0 for A, 1 for B), ``next_sentence_label`` (0 / 1; -100 when the
  shards have no pair objective), ``__key__`` (``train-000003-000127``: shard 3, sample 127),
  ``__url__``;
- with ``mask=True``, masked as the trainer masks it (bertscale.data.masking): ``input_ids``
  then holds the masked sequence, ``masked_positions`` / ``masked_labels`` (max_predictions_per_seq
  wide, padded with 0 / -100) the predictions, and ``position`` the global stream position the
  mask was drawn for: the position at which `bertscale pretrain` reads this sample in ``epoch``
  (train), or its index in the split (eval). So a sample is masked exactly as our loader masks
  it in that epoch, whatever order a user's pipeline reads it in; another epoch, another mask.

The result is a `webdataset` pipeline with webdataset's fluid methods (``.shuffle(n)``,
``.batched(n)``, ``.map(f)``, ...); shards come in the manifest's order (``shardshuffle=True``
shuffles them per iteration with webdataset's own shuffle). A damaged sample raises a UserError
naming the shard and the sample, as the trainer's loader does.

Limits: this reads shards sequentially, as webdataset does: it has none of the trainer loader's
exact resumable position or world-size-independent batches (bertscale.data.loader), and remote
shards are streamed, not cached per node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from bertscale.data import remote
from bertscale.data.masking import Masker, MaskingConfig
from bertscale.data.shards import Manifest, SampleError, decode_sample, read_manifest
from bertscale.errors import UserError
from bertscale.tokenizer import read_vocab

__all__ = ["ShardPipeline", "shard_pipeline", "decode"]


class ShardPipeline(wds.DataPipeline, wds.FluidInterface):
    """A webdataset pipeline with webdataset's fluid methods (what `webdataset.WebDataset` is)."""


def _open_shards(source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's url -> stream stage, with store URLs opened through fsspec."""
    for sample in source:
        url = sample["url"]
        try:
            stream = remote.open_read(url) if remote.is_remote(url) else open(url, "rb")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            raise UserError(f"shard {url}: {remote.reason(e)}") from None
        read = False
        try:
            yield dict(sample, stream=stream)
            read = True
        finally:
            if read:  # the whole shard: a command that failed (pipe:) is an error now
                try:
                    stream.close()
                except Exception as e:  # noqa: BLE001 - any store client error becomes one line
                    raise UserError(f"shard {url}: {remote.reason(e)}") from None
            else:  # the reader stopped early: a pipe's command may have died of SIGPIPE
                with contextlib.suppress(Exception):
                    stream.close()


def _raise(exc: Exception) -> bool:
    if isinstance(exc, UserError):
        raise exc
    raise UserError(f"reading a shard: {type(exc).__name__}: {exc}") from exc


class _Decoder:
    """A `.sample` blob -> arrays (and masks); picklable, so DataLoader workers can run it."""

    def __init__(self, manifest: Manifest, split: str, seed: int | None, epoch: int,
                 masking: MaskingConfig | None, shuffle_window: int | None):
        from bertscale.data.order import GlobalOrder

        self.no_pair = manifest.pair_objective == "mlm"
        self.width = np.dtype(manifest.token_dtype).itemsize
        self.split = split
        self.seq_len = manifest.seq_len
        self.epoch = epoch
        self.masker = None
        if masking is not None:
            vocab = read_vocab(manifest.vocab_file)
            self.pad_id = vocab["[PAD]"]
            self.masker = Masker(masking, vocab, manifest.seed if seed is None else seed)
            window = 4 * manifest.samples_per_shard if shuffle_window is None else shuffle_window
            self.order = GlobalOrder([s.samples for s in manifest.shards[split]],
                                     manifest.seed if seed is None else seed,
                                     split == "train", window)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = sample["__key__"]
        blob = sample.get("sample")
        try:
            split, shard, offset = key.split("-")
            shard_i, offset_i = int(shard), int(offset)
            if split != self.split:
                raise ValueError(f"a {split} sample in a {self.split} shard")
            if blob is None:
                raise ValueError("no .sample member")
            ids, a_len, label = decode_sample(blob, width=self.width)
        except (SampleError, ValueError) as e:
            raise UserError(f"shard {sample.get('__url__')}: sample {key}: {e}") from None
        ids = ids.astype(np.int64)
        n = len(ids)
        out: dict[str, Any] = {
            "__key__": key, "__url__": sample.get("__url__"),
            "input_ids": ids,
            "token_type_ids": (np.arange(n) >= a_len).astype(np.int64),
            "next_sentence_label": -100 if self.no_pair or label < 0 else int(label),
        }
        if self.masker is not None:
            position = (self.order.position_of(self.epoch, shard_i, offset_i)
                        if self.split == "train" else self.order.position_of(0, shard_i, offset_i))
            padded = np.full((1, self.seq_len), self.pad_id, dtype=np.int64)
            padded[0, :n] = ids
            masked, mpos, mlabels = self.masker(padded, np.array([n]), np.array([position]))
            out.update(input_ids=masked[0, :n], masked_positions=mpos[0],
                       masked_labels=mlabels[0], position=position)
        return out


def decode(manifest: str | Path | Manifest, split: str = "train") -> _Decoder:
    """The decoding stage alone (no masks), for a pipeline a user builds around our shards."""
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    return _Decoder(m, split, None, 0, None, None)


def shard_pipeline(manifest: str | Path | Manifest, split: str = "train", *, mask: bool = False,
                   masking: MaskingConfig | None = None, epoch: int = 0, seed: int | None = None,
                   shuffle_window: int | None = None, shardshuffle: bool = False,
                   split_by_node: bool = True, split_by_worker: bool = True) -> ShardPipeline:
    """A webdataset pipeline over the `split` shards of a prepared manifest (a path or a store
    URL), yielding decoded samples (module docstring). `mask`: mask with `masking` (default
    MaskingConfig()) as the trainer with `seed` (default: the manifest's seed; the trainer's is
    train.seed) would in `epoch`. `split_by_node` / `split_by_worker`: deal the shards over
    torch.distributed ranks and DataLoader workers, as webdataset's splitters do."""
    m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    if split not in m.shards:
        raise UserError(f"{m.path}: no split {split!r} (has {', '.join(m.shards)})")
    if epoch < 0:
        raise UserError(f"epoch {epoch} is negative")
    urls = [m.shard_location(split, i) for i in range(len(m.shards[split]))]
    if not urls:
        raise UserError(f"{m.path}: split {split!r} has no shards")
    decoder = _Decoder(m, split, seed, epoch, (masking or MaskingConfig()) if mask else None,
                       shuffle_window)
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if shardshuffle:
        stages.append(wds.shuffle(len(urls)))
    if split_by_node:
        stages.append(wds.split_by_node)
    if split_by_worker:
        stages.append(wds.split_by_worker)
    stages += [_open_shards, wds.pipelinefilter(tar_file_expander)(handler=_raise),
               wds.pipelinefilter(group_by_keys)(handler=_raise), wds.map(decoder)]
    return ShardPipeline(*stages)
