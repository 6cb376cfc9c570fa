"""BERT (Devlin et al. 2018) as Google's release defines it, in single-device PyTorch.

Post-LayerNorm Transformer encoder, exact erf GELU, learned absolute position and token type
embeddings, every weight matrix and embedding drawn from a normal(0, 0.02) truncated at two
standard deviations (TensorFlow's `truncated_normal_initializer`), biases zero, LayerNorm 1/0.
Module names equal Hugging Face's `BertForPreTraining`, so converting weights is a key map
(see `bertscale.hf`).

Limits, stated honestly:
- Parallelism (DeepSpeed ZeRO, data parallel) is applied from outside; nothing here knows about
  it. The MLM decoder shares its weight Parameter with the word embeddings (a tie by object, as
  Hugging Face does), which ZeRO-3 gathers per module like any other parameter.
- Attention goes through `scaled_dot_product_attention` with an additive key-padding mask of
  shape (B, 1, 1, T). With padding the flash kernel cannot be used (it takes no mask) and PyTorch
  picks the memory-efficient or math kernel; with `attention_mask=None`, or a mask with no
  padding in it (checked once per forward: one host sync), every kernel is eligible.
  A row whose keys are all padding gets uniform attention (finite, as in Hugging Face), never NaN.
- Only absolute position embeddings; no cross-attention, no decoder / KV cache.
- The [PAD] embedding row is an ordinary row (Google's release neither zeroes nor freezes it;
  Hugging Face zeroes it at init). Padded positions never reach a real token through attention.

The unpadded path (`BertModel.unpad`, off by default; bertscale.parallelize.apply_fast_paths
switches it with the runtime fast paths, and tests/test_fastpaths.py holds it to the plain path):
with an attention_mask, the real tokens are gathered once into a (N, H) matrix and every dense
layer, LayerNorm, dropout and the FFN run on it, so padding costs nothing. Attention runs per
sequence (`BertModel.varlen_attention`): on CUDA in fp16/bf16 through the variable-length flash
kernel (`aten._flash_attention_forward` with cumulative sequence lengths, dropout included);
elsewhere one SDPA call per sequence (exact, no padded T x T work). Outputs are re-padded at the
end: padded positions of `last_hidden_state` are 0 (the plain path leaves finite junk there), and
a sequence with no real token at all gets zeros where the plain path gives uniform attention.
Dropout masks differ from the plain path's (other shapes), so parity holds with dropout off.
The sparse MLM head (`masked_positions`) is always on when positions are given: it is exact.

Runtime concerns (activation checkpointing, torch.compile) are not here: bertscale.parallelize
applies them to a built model. Inputs are the caller's to check (sequence length against
`max_position_embeddings`, the flash kernel's requirements); what reaches `forward` unchecked
raises ValueError, a programming error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertscale.config import ModelConfig
from bertscale.errors import UserError

__all__ = [
    "BertOutput", "PreTrainingOutput", "LossParts", "BertModel", "BertForPreTraining",
    "BertForSequenceClassification", "BertForQuestionAnswering", "BertForMultipleChoice",
    "BertForTokenClassification", "pretraining_loss", "init_weights", "count_parameters",
    "load_pretrained", "UNPAD_KERNELS",
]

_ACTIVATIONS = {
    "gelu": F.gelu,                                       # exact erf form, Google's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "relu": F.relu,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise UserError(f"model.hidden_act {name!r} is not supported; choose one of "
                        f"{', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# ------------------------------------------------------------------------- the unpadded path

UNPAD_KERNELS = ("auto", "flash", "per_sequence")
"""Attention kernels of the unpadded path (`BertModel.varlen_attention`)."""


@dataclass
class _Packed:
    """Where the real tokens of a padded (B, T) batch sit once packed into (N, ...)."""

    index: Tensor        # (N,) int64 flat positions b * T + t of the real tokens, in order
    cu_seqlens: Tensor   # (B + 1,) int32 start of each sequence in the packed order
    lengths: list[int]   # real tokens per sequence (Python ints: the kernels need them)
    max_len: int
    batch: int
    seq_len: int
    flash: bool          # use the variable-length flash kernel


def _flash_varlen_ok(x: Tensor, head_dim: int) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


@torch.compiler.disable  # sequence lengths are data: keep them out of compiled graphs
def _packed_attention(q: Tensor, k: Tensor, v: Tensor, p: _Packed, dropout_p: float) -> Tensor:
    """Bidirectional attention within each sequence of a packed batch; q, k, v (N, A, D)."""
    if p.flash:
        # The varlen flash kernel; autograd knows its backward (the same op nested tensors use).
        return torch.ops.aten._flash_attention_forward(
            q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_len, p.max_len, dropout_p,
            False, False)[0]                                                  # (N, A, D)
    # One SDPA call per sequence, heads as the batch dimension: exact L_i x L_i work, no mask.
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)    # (A, N, D)
    outs = []
    for qi, ki, vi in zip(qh.split(p.lengths, 1), kh.split(p.lengths, 1), vh.split(p.lengths, 1)):
        if qi.shape[1]:
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p))
    return torch.cat(outs, 1).transpose(0, 1)                                 # (N, A, D)


def _pack(attention_mask: Tensor, x_dtype: torch.dtype, head_dim: int, device: torch.device,
          kernel: str, lengths: list[int] | None = None) -> _Packed:
    """Where the real tokens are. With `lengths` (each row's real-token count, known on the
    host) nothing is read back from the device; without, the mask is read back once (a sync)."""
    keep = attention_mask.to(torch.bool)                                      # (B, T)
    B, T = keep.shape
    lengths_t = keep.sum(1)                                                   # (B,)
    flat = keep.reshape(-1)                                                   # (B*T,)
    if lengths is None:
        lengths = lengths_t.tolist()  # one host sync per forward, shared by every layer
        index = flat.nonzero().squeeze(1)                                     # (N,)
    else:
        index = _nonzero_sized(flat, sum(lengths))                            # (N,)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths_t.cumsum(0)
    probe = torch.empty(0, dtype=x_dtype, device=device)
    flash = kernel != "per_sequence" and _flash_varlen_ok(probe, head_dim)
    if kernel == "flash" and not flash:
        raise ValueError(f"varlen_attention 'flash' needs CUDA, fp16/bf16 and a head dim that is "
                        f"a multiple of 8 up to 256; got {device} {x_dtype} head dim {head_dim}")
    return _Packed(index, cu, list(lengths), max(lengths, default=0), B, T, flash)


def _nonzero_sized(flat: Tensor, n: int) -> Tensor:
    """The positions of the `n` true entries of `flat`, in order, without a host round trip:
    `nonzero_static` (CUDA since torch 2.6); on an older CUDA build, a stable sort, which needs
    no sync either."""
    try:
        return torch.nonzero_static(flat, size=n).squeeze(1)
    except (NotImplementedError, RuntimeError):
        return torch.argsort(flat.to(torch.int8), descending=True, stable=True)[:n]


def _unpack(x: Tensor, p: _Packed) -> Tensor:
    """(N, H) packed -> (B, T, H), zeros at padded positions."""
    out = x.new_zeros(p.batch * p.seq_len, x.shape[-1])
    return out.index_copy(0, p.index, x).view(p.batch, p.seq_len, x.shape[-1])


# ---------------------------------------------------------------------------------- outputs


@dataclass
class BertOutput:
    last_hidden_state: Tensor                      # (B, T, H)
    pooler_output: Tensor | None = None            # (B, H): tanh(dense(h[CLS]))
    hidden_states: tuple[Tensor, ...] | None = None  # L + 1 of (B, T, H); [0] = embeddings


@dataclass
class PreTrainingOutput:
    mlm_logits: Tensor   # (B, P, V) at masked_positions, else (B, T, V)
    nsp_logits: Tensor   # (B, 2): 0 = B follows A, 1 = B is random (Google's convention)


@dataclass
class LossParts:
    total: Tensor        # mlm + nsp, scalar
    mlm: Tensor          # mean cross-entropy over predicted tokens (0 when there are none)
    nsp: Tensor          # mean cross-entropy over labelled pairs (0 for the MLM-only objective)
    mlm_correct: Tensor  # int64 scalars: argmax hits and counts, for accuracy across ranks
    mlm_count: Tensor
    nsp_correct: Tensor
    nsp_count: Tensor


# ------------------------------------------------------------------------------- the encoder


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor,
                positions: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, H); or packed (N,) ids with their (N,) `positions` -> (N, H)."""
        if positions is None:
            T = input_ids.shape[1]
            if T > self.position_embeddings.num_embeddings:
                raise ValueError(f"sequence length {T} exceeds model.max_position_embeddings "
                                 f"{self.position_embeddings.num_embeddings}")
            positions = torch.arange(T, device=input_ids.device)              # (T,)
        x = (self.word_embeddings(input_ids)                                  # (B, T, H)
             + self.token_type_embeddings(token_type_ids)                     # (B, T, H)
             + self.position_embeddings(positions))                           # (T, H) broadcast
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, mask: Tensor | _Packed | None) -> Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, _Packed):                                         # x: (N, H)
            N, H = x.shape
            q, k, v = (t.view(N, self.num_heads, self.head_dim)               # (N, A, D)
                       for t in (self.query(x), self.key(x), self.value(x)))
            return _packed_attention(q, k, v, mask, dropout_p).reshape(N, H)  # (N, H)
        B, T, H = x.shape

        def heads(t: Tensor) -> Tensor:                                       # (B, A, T, D)
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        y = F.scaled_dot_product_attention(                                   # (B, A, T, D)
            q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, T, H)                             # (B, T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)         # post-LN


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, mask: Tensor | _Packed | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))                                        # (B, T, 4H)


class BertFFNOutput(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)         # post-LN


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertFFNOutput(config)

    def forward(self, x: Tensor, mask: Tensor | _Packed | None) -> Tensor:
        a = self.attention(x, mask)                                           # (B, T, H)
        return self.output(self.intermediate(a), a)                           # (B, T, H)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))                                # (B, H) from [CLS]


class BertModel(nn.Module):
    """The encoder: embeddings, L post-LN Transformer layers, optional [CLS] pooler."""

    def __init__(self, config: ModelConfig, add_pooling_layer: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config))
        self.unpad = False
        """Run the encoder on the real tokens only when an attention_mask is given (see the
        module docstring); the same outputs at real positions."""
        self.varlen_attention: Literal["auto", "flash", "per_sequence"] = "auto"
        """The unpadded path's attention kernel, one of UNPAD_KERNELS."""

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None,
                output_hidden_states: bool = False, *,
                lengths: list[int] | None = None) -> BertOutput:
        """`lengths`: each sequence's number of real tokens (the row sums of `attention_mask`),
        when the caller knows them on the host (a loader does): the mask is then never read back
        from the device, which on a GPU would wait for all queued work."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        packed: _Packed | None = None
        mask: Tensor | _Packed | None = None
        if self.unpad and attention_mask is not None:
            # Real tokens only, from the embeddings on: (N, H) with N = attention_mask.sum().
            B, T = input_ids.shape
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds model.max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            device = input_ids.device
            # The kernel choice depends on the dtype attention will see (autocast's, if on).
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else self.embeddings.word_embeddings.weight.dtype)
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            packed = mask = _pack(attention_mask, dtype, head_dim, device, self.varlen_attention,
                                  lengths)
            positions = torch.arange(T, device=device).repeat(B)              # (B*T,)
            x = self.embeddings(input_ids.reshape(-1)[packed.index],          # (N, H)
                                token_type_ids.reshape(-1)[packed.index],
                                positions[packed.index])
        else:
            x = self.embeddings(input_ids, token_type_ids)                    # (B, T, H)
            keep = None if attention_mask is None else attention_mask.to(torch.bool)
            # A mask of all real tokens is no mask: leaving it out lets SDPA pick the flash
            # kernel (which takes no mask). Same arithmetic.
            if keep is None:
                full = True
            elif lengths is not None:
                full = all(n == input_ids.shape[1] for n in lengths)          # no device read
            else:
                full = bool(keep.all())  # one host sync, as in transformers
            if keep is not None and not full:
                # Built once, broadcast over heads and query rows: 0 where a key is a real
                # token, the dtype's minimum where it is padding (finite, so an all-padding row
                # stays finite).
                keep = keep[:, None, None, :]                                 # (B, 1, 1, T)
                mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
                mask.masked_fill_(~keep, torch.finfo(x.dtype).min)
        hidden: list[Tensor] = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)                                                # (B, T, H) | (N, H)
            if output_hidden_states:
                hidden.append(x)
        if packed is not None:                                                # (N, H) -> (B, T, H)
            x = _unpack(x, packed)
            hidden = [_unpack(h, packed) for h in hidden] if output_hidden_states else hidden
        pooled = self.pooler(x) if self.pooler is not None else None          # (B, H)
        return BertOutput(x, pooled, tuple(hidden) if output_hidden_states else None)


# ------------------------------------------------------------------------ pretraining heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # Tied to the input embeddings (the same Parameter object); the bias is the head's own.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.transform(h)) + self.bias                    # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(nn.Module):
    """Masked LM + next sentence prediction, the paper's pretraining model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        # Not cls.apply(init): that would redraw the word embeddings through the tied decoder.
        self.cls.predictions.transform.apply(lambda m: init_weights(m, config))
        init_weights(self.cls.seq_relationship, config)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None,
                masked_positions: Tensor | None = None, *,
                lengths: list[int] | None = None) -> PreTrainingOutput:
        """`lengths`: see BertModel.forward."""
        out = self.bert(input_ids, token_type_ids, attention_mask, lengths=lengths)
        h = out.last_hidden_state                                             # (B, T, H)
        if masked_positions is not None:
            # Sparse head: the V-wide decoder runs only at the P masked positions per sequence
            # (Google's gather_indexes), not at all T; padded positions gather index 0 and
            # carry label -100.
            idx = masked_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (B, P, H)
            h = torch.gather(h, 1, idx)                                       # (B, P, H)
        mlm_logits = self.cls.predictions(h)                                  # (B, P|T, V)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)             # (B, 2)
        return PreTrainingOutput(mlm_logits, nsp_logits)


def pretraining_loss(out: PreTrainingOutput, masked_labels: Tensor,
                     next_sentence_label: Tensor, vocab_size: int | None = None) -> LossParts:
    """Google's pretraining loss: mean MLM cross-entropy over predicted tokens plus mean NSP
    cross-entropy, computed in fp32 whatever the logits' dtype. Labels of -100 are ignored;
    an all-ignored term is 0 (not NaN), so the MLM-only objective needs no special case.
    `vocab_size`: the tokenizer's vocabulary when the model's rows are padded past it; the
    padded rows' logits are dropped, so they are never predicted and the loss is the unpadded
    model's."""
    V = vocab_size or out.mlm_logits.shape[-1]
    mlm_logits = out.mlm_logits[..., :V].reshape(-1, V).float()               # (B*P, V)
    mlm_labels = masked_labels.reshape(-1)                                    # (B*P,)
    mlm_valid = mlm_labels != -100
    mlm_count = mlm_valid.sum()
    mlm = (F.cross_entropy(mlm_logits, mlm_labels, ignore_index=-100, reduction="sum")
           / mlm_count.clamp(min=1))
    mlm_correct = ((mlm_logits.argmax(-1) == mlm_labels) & mlm_valid).sum()

    nsp_logits = out.nsp_logits.float()                                       # (B, 2)
    nsp_valid = next_sentence_label != -100
    nsp_count = nsp_valid.sum()
    nsp = (F.cross_entropy(nsp_logits, next_sentence_label, ignore_index=-100, reduction="sum")
           / nsp_count.clamp(min=1))
    nsp_correct = ((nsp_logits.argmax(-1) == next_sentence_label) & nsp_valid).sum()
    return LossParts(mlm + nsp, mlm, nsp, mlm_correct, mlm_count, nsp_correct, nsp_count)


# ------------------------------------------------------------------------ fine-tuning heads


class BertForSequenceClassification(nn.Module):
    """[CLS] pooler -> dropout -> linear. num_labels == 1 is regression (STS-B)."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        pooled = self.bert(input_ids, token_type_ids, attention_mask).pooler_output  # (B, H)
        return self.classifier(self.dropout(pooled))                           # (B, num_labels)


class BertForQuestionAnswering(nn.Module):
    """SQuAD span head: a linear map of each token to (start, end) logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_weights(self.qa_outputs, config)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.bert(input_ids, token_type_ids, attention_mask).last_hidden_state  # (B, T, H)
        start, end = self.qa_outputs(h).unbind(-1)                            # (B, T) each
        return start, end


class BertForMultipleChoice(nn.Module):
    """SWAG: every (context, choice) pair is encoded; one score per choice from the pooler."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        init_weights(self.classifier, config)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        B, C, T = input_ids.shape

        def flat(t: Tensor | None) -> Tensor | None:                           # (B*C, T)
            return None if t is None else t.reshape(B * C, T)

        pooled = self.bert(flat(input_ids), flat(token_type_ids),
                           flat(attention_mask)).pooler_output                # (B*C, H)
        return self.classifier(self.dropout(pooled)).view(B, C)                # (B, C)


class BertForTokenClassification(nn.Module):
    """NER: a label per token (the paper tags the first sub-token of each word)."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        h = self.bert(input_ids, token_type_ids, attention_mask).last_hidden_state  # (B, T, H)
        return self.classifier(self.dropout(h))                               # (B, T, labels)


# ---------------------------------------------------------------------------- init, loading


@torch.no_grad()
def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Google's initialisation for one module (use with `model.apply`): weights of Linear and
    Embedding ~ normal(0, initializer_range) truncated at +-2 std, biases 0, LayerNorm 1 / 0."""
    std = config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (the tied decoder / embedding matrix counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_pretrained(model: nn.Module, state_dict: Mapping[str, Tensor], source: str,
                    warn: bool = True) -> list[str]:
    """Load pretrained weights (BertForPreTraining keys, as `bertscale.hf.import_state_dict` and
    `bertscale.training.checkpoint.consolidated.load_consolidated` give them) into any model of this module.

    Every shape must match and the encoder layers must be complete, else UserError naming
    `source`. Weights the checkpoint lacks keep their fresh initialisation and are returned:
    a fine-tuning head (expected, silent), or a pretrained part such as the MLM / NSP heads or
    the pooler of an encoder-only checkpoint (a warning names them). Weights the model has no
    place for (the pretraining heads when fine-tuning) are ignored. The tied decoder weight
    follows the word embeddings.
    """
    if not hasattr(model, "bert"):  # a bare BertModel: its keys are the "bert." ones
        state_dict = {k[len("bert."):]: v for k, v in state_dict.items() if k.startswith("bert.")}
    def is_pretrained_part(key: str) -> bool:  # as opposed to a fine-tuning head
        return key.startswith(("bert.", "cls.")) or not hasattr(model, "bert")

    tied = "cls.predictions.decoder.weight"
    fresh: list[str] = []
    to_load: dict[str, Tensor] = {}
    for key, param in model.state_dict().items():
        if key == tied:
            continue
        if key not in state_dict:
            fresh.append(key)
            continue
        value = state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{source}: weight {key} has shape {tuple(value.shape)} but the model "
                            f"config needs {tuple(param.shape)}")
        to_load[key] = value
    encoder_missing = [k for k in fresh if is_pretrained_part(k)
                       and not k.startswith("cls.") and "pooler." not in k]
    if encoder_missing:
        shown = ", ".join(encoder_missing[:4]) + (" ..." if len(encoder_missing) > 4 else "")
        raise UserError(f"{source}: checkpoint lacks {len(encoder_missing)} encoder weights "
                        f"({shown}); is it a BERT checkpoint of this shape?")
    model.load_state_dict(to_load, strict=False)
    head_fresh = [k for k in fresh if is_pretrained_part(k)]
    if warn and head_fresh:
        warnings.warn(f"{source}: checkpoint has no weights for {', '.join(head_fresh[:4])}"
                      f"{' ...' if len(head_fresh) > 4 else ''}; those keep a fresh "
                      f"initialisation", stacklevel=2)
    return fresh
