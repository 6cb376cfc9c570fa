"""Contextual features from a frozen BERT into files (`bertscale embed`), and reading them back:
the records read (records.py), the run (run.py), the features folder (store.py)."""

from bertscale.embed.records import InputSpec, read_records
from bertscale.embed.run import OUTPUT_FORMATS, POOLINGS, EmbedConfig, run
from bertscale.embed.store import iter_features, load_features, read_manifest

__all__ = ["OUTPUT_FORMATS", "POOLINGS", "EmbedConfig", "InputSpec", "iter_features",
           "load_features", "read_manifest", "read_records", "run"]
