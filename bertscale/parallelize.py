"""How a built model runs, applied from outside it: bertscale.model is the paper's network, and
this module switches its fast paths, as torchtitan's `models/llama3/parallelize.py` applies
activation checkpointing and torch.compile to a model that knows nothing of either.

`apply_fast_paths(model, FastPaths(...))` is the one entry point, called once the model is built
(and its weights loaded); calling it again replaces what it applied before, so
`apply_fast_paths(model, FastPaths())` gives back the plain model. No fast path changes a
parameter or its name: checkpoints, Hugging Face export and DeepSpeed ZeRO see the same model.

For every `BertModel` inside `model`:
- `unpad`, `varlen_attention` set the encoder's attention implementation (`BertModel.unpad`,
  `BertModel.varlen_attention`). Which arithmetic runs is the network's business, so the switch
  and the unpadded path live in bertscale.model; see its docstring.
- `checkpoint_activations`: each encoder layer's activations are recomputed in the backward
  (`torch.utils.checkpoint`, non-reentrant, RNG state restored so dropout matches); forwards
  without grad run plainly. Under ZeRO-3 the recomputation goes through the layer's submodules,
  whose hooks gather their partitioned parameters again (tested on two ranks in
  tests/test_pretrain.py).
- `compile`: each encoder layer's forward goes through `torch.compile`. If compiling or running
  the compiled forward fails, one warning names the compiler's error, every layer of that model
  runs eager from then on, and `compile_failure(model)` says why (what `bertscale bench` reports);
  a failure inside the compiled backward is raised, not caught. The packed attention call stays
  out of the compiled graphs (bertscale.model disables compilation there: its sequence lengths
  are data). On this project's CPU it did not speed up a BERT-Base step (GEMM-bound); it is meant
  for GPUs.

How: each encoder layer's `forward` is replaced on the instance by a `_LayerForward`; the class's
forward stays the plain one. A wrapper module (torch's checkpoint_wrapper, or `torch.compile` of
the module) would add its own name to every parameter name below it. With both switches on,
checkpointing is outside compilation: the backward recomputes the compiled forward.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from bertscale.errors import UserError
from bertscale.model import UNPAD_KERNELS, BertLayer, BertModel

__all__ = ["FastPaths", "apply_fast_paths", "compile_failure"]


@dataclass(frozen=True)
class FastPaths:
    """Optional speed-ups; none changes the parameters or their names, so checkpoints, Hugging
    Face interop and ZeRO see the same model. Not a ModelConfig field: the config mirrors
    config.json (the model's shape), these are how it runs."""

    unpad: bool = False
    """Drop padding before the encoder: dense layers, LayerNorms and the FFN run on the N real
    tokens ((N, H)), attention per sequence. Applies only when an attention_mask is given."""
    varlen_attention: Literal["auto", "flash", "per_sequence"] = "auto"
    """Attention kernel of the unpadded path. "flash": the variable-length flash kernel (CUDA,
    fp16/bf16, head dim a multiple of 8 up to 256); "per_sequence": one SDPA call per sequence
    (any device and dtype); "auto": flash where it applies, else per_sequence."""
    checkpoint_activations: bool = False
    """Recompute each encoder layer in the backward instead of storing its activations."""
    compile: bool = False
    """torch.compile each encoder layer (falls back to eager, with one warning, on failure)."""
    compile_backend: str | Callable[..., Any] = "inductor"
    """torch.compile backend: a name ("inductor"; "aot_eager" compiles fast and fuses nothing)
    or a backend callable."""

    def validate(self) -> None:
        if self.varlen_attention not in UNPAD_KERNELS:
            raise UserError(f"varlen_attention {self.varlen_attention!r}: choose auto, flash "
                            f"or per_sequence")


@dataclass
class _CompileState:
    """Shared by the layers of one model: the first failure sends all of them back to eager."""

    backend: str | Callable[..., Any]
    error: str | None = None
    """Why torch.compile fell back to eager (None: it did not)."""


class _LayerForward:
    """What one encoder layer runs instead of its class's forward."""

    def __init__(self, layer: BertLayer, fast: FastPaths, state: _CompileState):
        self.eager = types.MethodType(type(layer).forward, layer)
        self.compiled = (torch.compile(self.eager, backend=fast.compile_backend)
                         if fast.compile else None)
        self.checkpoint = fast.checkpoint_activations
        self.state = state

    def __call__(self, x: Tensor, mask: Any) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            # Looked up at call time (not imported by name): tests count the calls. Early stop
            # ends a recomputation by raising from inside it, through the compiled forward,
            # where _run would take it for a compiler failure: off when compiled.
            return torch.utils.checkpoint.checkpoint(self._run, x, mask, use_reentrant=False,
                                                     early_stop=self.compiled is None)
        return self._run(x, mask)

    def _run(self, x: Tensor, mask: Any) -> Tensor:
        if self.compiled is None or self.state.error is not None:
            return self.eager(x, mask)
        try:
            return self.compiled(x, mask)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure: warn once, run eager
            self.state.error = _describe_compile_failure(e, self.state.backend)
            warnings.warn(f"torch.compile ({self.state.error}) failed, running the model eager "
                          f"from now on", RuntimeWarning, stacklevel=2)
            return self.eager(x, mask)


def _describe_compile_failure(e: BaseException, backend: str | Callable[..., Any]) -> str:
    root = e
    while True:  # the compiler's own error rather than dynamo's wrappers
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    first = (str(root).strip().splitlines() or [""])[0]
    return f"backend {getattr(backend, '__name__', backend)!r}: {type(root).__name__}: {first}"


def _encoders(model: nn.Module) -> list[BertModel]:
    found = [m for m in model.modules() if isinstance(m, BertModel)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no BertModel to set fast paths on")
    return found


def apply_fast_paths(model: nn.Module, fast: FastPaths) -> None:
    """Switch the fast paths of every BertModel inside `model`, replacing what an earlier call
    applied (see the module docstring)."""
    fast.validate()
    for bert in _encoders(model):
        bert.unpad, bert.varlen_attention = fast.unpad, fast.varlen_attention
        state = _CompileState(fast.compile_backend)
        for layer in bert.encoder.layer:
            layer.__dict__.pop("forward", None)  # back to the class's forward
            if fast.compile or fast.checkpoint_activations:
                layer.forward = _LayerForward(cast(BertLayer, layer), fast, state)


def compile_failure(model: nn.Module) -> str | None:
    """Why torch.compile fell back to eager in `model` (None: it did not, or compile is off)."""
    for bert in _encoders(model):
        for layer in bert.encoder.layer:
            run = layer.__dict__.get("forward")
            if isinstance(run, _LayerForward) and run.state.error is not None:
                return run.state.error
    return None
