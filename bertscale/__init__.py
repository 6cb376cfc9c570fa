"""bertscale: pretrain BERT at scale with DeepSpeed ZeRO, elastically, and fine-tune it."""

__version__ = "0.1.0"
