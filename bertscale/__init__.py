"""bertscale: pretrain BERT at scale with DeepSpeed ZeRO, elastically, and fine-tune it."""

__version__ = "0.1.0"


def from_pretrained(path, head=None, **kwargs):
    """A ready model from a Hugging Face folder, a bertscale run or a fine-tuned model folder
    (see bertscale.pretrained; imported on first use so that `import bertscale` stays light)."""
    from bertscale.pretrained import from_pretrained as load
    return load(path, head, **kwargs)


def tokenizer_for(path, max_length=None):
    """The checkpoint's WordPiece tokenizer with its own casing (see bertscale.pretrained)."""
    from bertscale.pretrained import tokenizer_for as load
    return load(path, max_length)
