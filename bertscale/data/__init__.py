"""Data: raw text → shards (`prepare`), shards → masked batches (`loader`).

`text` reads corpora and splits sentences (`tables`: Parquet, Arrow, save_to_disk folders),
`instances` builds sequence pairs as BERT does, `shards` defines the tar format and the manifest,
`prepare` runs the corpus → shards job, `masking` masks dynamically, `loader` streams exact,
resumable batches, `wds` serves the shards as a webdataset pipeline to other training loops. Importing this package
does not import torch (only `loader` does), so `prepare` workers start fast.
"""
