"""Dynamic masked-LM masking, vectorised over a micro-batch.

What is masked follows Google's ``create_masked_lm_predictions``: per sequence,
``n = min(max_predictions_per_seq, max(1, round(len(tokens) * mask_prob)))`` positions (len
counts [CLS] and [SEP]s, as Google's does), chosen uniformly among the non-special tokens
([CLS], [SEP] and padding are never chosen); each chosen token becomes [MASK] with probability
0.8, a random token with 0.1, and stays itself with 0.1. With ``whole_word`` the candidates are
whole words (a token and the ``##`` pieces after it), taken in random order and skipped when
they would overflow ``n``, exactly as Google's whole-word option; each of the word's tokens then
gets its own 80/10/10 draw.

Randomness is counter-based: every draw is a hash (splitmix64) of (seed, global sample position,
token index, stream), so the masks of a sample depend on its position in the global stream only,
not on the rank, the worker, the batch it lands in, or what was read before. That is what makes
the masked batches identical across world sizes and after a resume.

One deliberate difference: a random replacement is drawn uniformly from the vocabulary without
the five special tokens (Google's could be [CLS] or [PAD]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertscale.errors import ConfigError
from bertscale.tokenizer import SPECIAL_TOKENS


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15
    """Share of tokens to predict."""
    max_predictions_per_seq: int = 20
    """Cap on predictions per sequence and the width P of masked_positions (the paper: 20 at
    seq 128, 80 at seq 512)."""
    whole_word: bool = False
    """Mask whole words (all WordPiece pieces of a word together)."""
    mask_token_prob: float = 0.8
    """Of the chosen tokens: share replaced by [MASK]."""
    random_token_prob: float = 0.1
    """Of the chosen tokens: share replaced by a random token (the rest stay unchanged)."""

    def validate(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"masking.mask_prob {self.mask_prob} must be in (0, 1)")
        if self.max_predictions_per_seq < 1:
            raise ConfigError(f"masking.max_predictions_per_seq {self.max_predictions_per_seq} "
                              f"must be >= 1")
        if (self.mask_token_prob < 0 or self.random_token_prob < 0
                or self.mask_token_prob + self.random_token_prob > 1.0):
            raise ConfigError(f"masking.mask_token_prob {self.mask_token_prob} + random_token_prob "
                              f"{self.random_token_prob} must be probabilities summing to <= 1")


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_STREAM_SELECT, _STREAM_ACTION, _STREAM_TOKEN = 1, 2, 3


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def _to_unit(x: np.ndarray) -> np.ndarray:
    return (x >> _S11).astype(np.float64) * (1.0 / (1 << 53))


class Masker:
    """Masks micro-batches of token ids for one vocabulary."""

    def __init__(self, cfg: MaskingConfig, vocab: dict[str, int], seed: int):
        cfg.validate()
        self.cfg = cfg
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.pad_id = vocab["[PAD]"]
        self.mask_id = vocab["[MASK]"]
        size = max(vocab.values()) + 1
        special = np.zeros(size, dtype=bool)
        special[[vocab[t] for t in SPECIAL_TOKENS]] = True
        self.replacements = np.flatnonzero(~special).astype(np.int64)
        self.is_piece = np.zeros(size, dtype=bool)  # "##" continuation pieces
        for tok, i in vocab.items():
            if tok.startswith("##"):
                self.is_piece[i] = True
        with np.errstate(over="ignore"):
            self.key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ _GOLD)

    def _streams(self, positions: np.ndarray, stream: int) -> np.ndarray:
        # One 64-bit base per (seed, sample position, stream); tokens then index into it.
        p = positions.astype(np.uint64)
        return _mix(self.key ^ _mix(p * _GOLD + np.uint64(stream)))

    def _draw(self, base: np.ndarray, index: np.ndarray) -> np.ndarray:
        return _to_unit(_mix(base[:, None] + index.astype(np.uint64) * _GOLD))

    def num_to_predict(self, lengths: np.ndarray) -> np.ndarray:
        n = np.maximum(1, np.rint(lengths * self.cfg.mask_prob).astype(np.int64))
        return np.minimum(n, self.cfg.max_predictions_per_seq)

    def __call__(self, ids: np.ndarray, lengths: np.ndarray, positions: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (B, T) int64 padded; lengths (B,); positions (B,) global sample positions.

        Returns input_ids (B, T), masked_positions (B, P) (0-padded, ascending),
        masked_labels (B, P) (-100 padded)."""
        B, T = ids.shape
        P = self.cfg.max_predictions_per_seq
        cand = (np.arange(T)[None, :] < lengths[:, None]) & (ids != self.cls_id) & (ids != self.sep_id)
        n = np.minimum(self.num_to_predict(lengths), cand.sum(axis=1))
        with np.errstate(over="ignore"):
            u_sel = self._draw(self._streams(positions, _STREAM_SELECT), np.arange(T))  # (B, T)
            if self.cfg.whole_word:
                chosen = self._choose_words(ids, cand, n, u_sel, P)
            else:
                chosen = self._choose_tokens(cand, n, u_sel, P)
            valid = chosen < T                                   # (B, P)
            pos = np.where(valid, chosen, 0)
            labels = np.take_along_axis(ids, pos, axis=1)
            u_act = self._draw(self._streams(positions, _STREAM_ACTION), pos)
            u_tok = self._draw(self._streams(positions, _STREAM_TOKEN), pos)
        random_tok = self.replacements[(u_tok * len(self.replacements)).astype(np.int64)]
        new = np.where(u_act < self.cfg.mask_token_prob, self.mask_id,
                       np.where(u_act < self.cfg.mask_token_prob + self.cfg.random_token_prob,
                                random_tok, labels))
        out = ids.copy()
        rows = np.broadcast_to(np.arange(B)[:, None], (B, P))
        out[rows[valid], pos[valid]] = new[valid]
        return out, pos, np.where(valid, labels, -100)

    @staticmethod
    def _choose_tokens(cand: np.ndarray, n: np.ndarray, u: np.ndarray, P: int) -> np.ndarray:
        """The n[b] candidates with the smallest draws, as ascending positions; T marks unused."""
        B, T = cand.shape
        key = np.where(cand, u, 2.0)
        k = min(P, T)
        if k < T:
            idx = np.argpartition(key, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(T), (B, T)).copy()
        order = np.argsort(np.take_along_axis(key, idx, axis=1), axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        picked = np.where(np.arange(k)[None, :] < n[:, None], idx, T)
        picked.sort(axis=1)
        if k < P:
            picked = np.concatenate([picked, np.full((B, P - k), T, dtype=picked.dtype)], axis=1)
        return picked

    def _choose_words(self, ids: np.ndarray, cand: np.ndarray, n: np.ndarray, u: np.ndarray,
                      P: int) -> np.ndarray:
        B, T = ids.shape
        prev_cand = np.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        # A word starts at a candidate that is not a "##" piece, or whose left neighbour is not
        # a candidate (a piece cut off by truncation starts its own word).
        starts = cand & (~self.is_piece[ids] | ~prev_cand)
        picked = np.full((B, P), T, dtype=np.int64)
        for b in range(B):
            c = np.flatnonzero(cand[b])
            if len(c) == 0 or n[b] == 0:
                continue
            s = np.flatnonzero(starts[b, c])           # indices into c of word starts
            lens = np.diff(np.append(s, len(c)))
            word_pos = c[s]
            order = np.argsort(u[b, word_pos], kind="stable")
            out: list[int] = []
            limit = int(n[b])
            for w in order.tolist():
                if len(out) >= limit:
                    break
                length = int(lens[w])
                if len(out) + length > limit:
                    continue
                out.extend(range(int(word_pos[w]), int(word_pos[w]) + length))
            out.sort()
            picked[b, :len(out)] = out
        return picked
