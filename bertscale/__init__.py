"""bertscale: pretrain BERT at scale with DeepSpeed ZeRO, elastically, and fine-tune it.

Importing the package arms the parent-death signal of a worker that torchrun or the deepspeed
launcher spawned (bertscale.distributed.die_with_launcher; nothing otherwise): here, before
torch or DeepSpeed is imported, because a launcher killed during a worker's start-up otherwise
leaves it waiting in the rendezvous for half an hour, holding its GPU.
"""

from bertscale.distributed import die_with_launcher as _die_with_launcher

__version__ = "0.1.0"

_die_with_launcher()


def from_pretrained(path, head=None, **kwargs):
    """A ready model from a Hugging Face folder, a bertscale run or a fine-tuned model folder
    (see bertscale.pretrained; imported on first use so that `import bertscale` stays light)."""
    from bertscale.pretrained import from_pretrained as load
    return load(path, head, **kwargs)


def tokenizer_for(path, max_length=None):
    """The checkpoint's WordPiece tokenizer with its own casing (see bertscale.pretrained)."""
    from bertscale.pretrained import tokenizer_for as load
    return load(path, max_length)
