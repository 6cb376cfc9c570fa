"""Benchmarks that print measured numbers (`bertscale bench`): a pretraining step against
`transformers` and the largest micro-batch (model.py), fine-tuning steps by batch shape
(finetune.py), the data pipeline (data.py), object-store shards with prefetch (remote.py, over
s3_server.py) and quality at small scale (quality/)."""
