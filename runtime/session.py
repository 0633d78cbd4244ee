"""Stateful decoding over a backend: prefill a batch of prompts of different lengths, then step.

The session owns the KV cache (in the backend's native form), the attention mask and each row's next position.
Prompts are left-padded; attention_mask and position_ids follow the reference's rules (cumsum(mask) - 1, padded
slots 1). A step costs one graph run over one new token per active row: nothing grows with the number of steps
except the context that attention reads. Finished rows can be dropped (`keep_rows`), so they stop costing work.
"""

from __future__ import annotations

import numpy as np

from bigcode_deploy.runtime.bundle import Bundle, left_pad, position_ids
from bigcode_deploy.runtime.errors import BigCodeError, ContextOverflow, StateError
from bigcode_deploy.runtime.sampling import is_integer


def is_token_id(value: object, vocab_size: int) -> bool:
    """An int or numpy integer (never a bool) in [0, vocab_size)."""
    return is_integer(value) and 0 <= value < vocab_size


class DecodingSession:
    """One batch's decoding state over an entered backend: prefill(prompts) -> (B, vocab) float32 logits of each
    row's last position; step(tokens (B,)) -> (B, vocab); keep_rows(mask (B,)) drops finished rows and their cache.
    Raises BigCodeError for a bundle that is not causal-lm with a cache, no prompt, an empty prompt, the wrong number
    of tokens or flags, or an id outside the vocabulary; StateError for a step before a prefill; ContextOverflow
    when the context would exceed n_positions. A call that raises (also in the backend) changes nothing."""

    def __init__(self, backend, bundle: Bundle):
        if bundle.manifest.task != "causal-lm" or bundle.kv_cache is None:
            raise BigCodeError(
                f"decoding needs a causal-lm bundle with a KV cache; {bundle.path} is task "
                f"{bundle.manifest.task!r}" + ("" if bundle.kv_cache else " without a cache (exported with --no-cache)")
            )
        self.backend = backend
        self.bundle = bundle
        self.n_positions = bundle.config["n_positions"]
        self.vocab_size = bundle.config["vocab_size"]
        self.cache = None
        self.attention_mask = np.zeros((0, 0), dtype=np.int64)  # (B, P)
        self.next_position = np.zeros(0, dtype=np.int64)  # (B,)
        self.rows = np.zeros(0, dtype=np.int64)  # original row index of each active row

    @property
    def context_length(self) -> int:
        return self.attention_mask.shape[1]

    def check_prompts(self, prompts: list[list[int]]) -> list[list[int]]:
        """The prompts as lists of ints, or BigCodeError: at least one prompt, each a non-empty 1-d sequence of
        integer ids inside the vocabulary."""
        if isinstance(prompts, (str, bytes)):
            raise BigCodeError("prompts must be lists of token ids, not text (encode text with the tokenizer first)")
        if not hasattr(prompts, "__len__") or len(prompts) == 0:
            raise BigCodeError("give at least one prompt (a list of token id lists)")
        out = []
        for i, p in enumerate(prompts):
            try:
                ids = np.asarray(p) if not isinstance(p, (str, bytes)) else np.asarray(None)
            except (TypeError, ValueError):  # ragged nesting
                ids = np.asarray(None)
            if ids.ndim != 1 or ids.size == 0:
                raise BigCodeError(f"prompt {i} is not a non-empty list of token ids; every prompt needs one or more")
            if ids.dtype.kind not in "iu" or (
                not isinstance(p, np.ndarray) and any(isinstance(t, (bool, np.bool_)) for t in p)
            ):  # numpy reads [True, 2] as int64: a bool among ids is refused here
                kind = ids.dtype if ids.dtype.kind not in "iu" else "bool"
                raise BigCodeError(f"prompt {i} holds {kind} values; give integer token ids")
            self.check_ids(ids)
            out.append([int(t) for t in ids])
        return out

    def check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise BigCodeError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")

    def check_fits(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        self._check_length(max(len(p) for p in self.check_prompts(prompts)), max_new_tokens)

    def _check_length(self, longest: int, max_new_tokens: int) -> None:
        if longest + max_new_tokens > self.n_positions:
            raise ContextOverflow(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
                f"{self.n_positions} positions; shorten the prompt or lower max_new_tokens"
            )

    # prefill, step and keep_rows validate everything before they change anything, and assign the new state only
    # after the backend returned: a call that raises (a bad argument, or the backend itself) leaves the session
    # exactly as it was (cache, attention_mask, next_position, rows), so the caller may retry or go on.

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Run the prompts (left-padded into one batch), replacing any previous batch. Returns each row's
        last-position logits (B, vocab)."""
        prompts = self.check_prompts(prompts)
        self._check_length(max(len(p) for p in prompts), 0)
        input_ids, mask = left_pad(prompts)  # (B, T) each
        logits, cache = self.backend.step(
            input_ids, mask, position_ids(mask, 0), self.backend.empty_cache(len(prompts))
        )
        self.cache, self.attention_mask = cache, mask
        self.next_position = mask.sum(1)  # the next token's position: the count of real tokens so far
        self.rows = np.arange(len(prompts))
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per active row (B,). Returns the next logits (B, vocab). StateError before a prefill."""
        if self.cache is None:
            raise StateError("step needs a prefill first")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.shape[0] != len(self.rows):
            raise BigCodeError(
                f"step takes one token per active row ({len(self.rows)}), got {tokens.size} in shape {tokens.shape}"
            )
        if tokens.dtype.kind not in "iu":
            raise BigCodeError(f"step takes integer token ids, got {tokens.dtype}")
        self.check_ids(tokens)
        if self.context_length + 1 > self.n_positions:
            raise ContextOverflow(f"the context is full ({self.n_positions} positions)")
        tokens = tokens.astype(np.int64).reshape(-1, 1)  # (B, 1)
        mask = np.concatenate([self.attention_mask, np.ones_like(tokens)], axis=1)  # (B, P + 1)
        positions = self.next_position[:, None]  # (B, 1)
        logits, cache = self.backend.step(tokens, mask, positions, self.cache)
        self.cache, self.attention_mask, self.next_position = cache, mask, self.next_position + 1
        return logits

    def keep_rows(self, keep: np.ndarray) -> None:
        """Drop the rows where keep is False (their cache too). At least one row must stay."""
        if self.cache is None:
            raise StateError("keep_rows needs a prefill first")
        keep = np.asarray(keep)
        if keep.ndim != 1 or keep.shape[0] != len(self.rows):
            raise BigCodeError(f"keep_rows takes one flag per active row ({len(self.rows)}), got shape {keep.shape}")
        if keep.dtype != bool:  # "False" or nan would read as True: only real booleans say which rows stay
            raise BigCodeError(f"keep_rows takes booleans, got {keep.dtype}")
        if keep.all():
            return
        if not keep.any():
            raise BigCodeError("keep_rows would drop every row; prefill a new batch instead")
        index = np.flatnonzero(keep)
        cache = self.backend.select_rows(self.cache, index)
        self.cache, self.attention_mask = cache, self.attention_mask[index]
        self.next_position, self.rows = self.next_position[index], self.rows[index]
