"""Stateful decoding over a backend: prefill a batch of prompts of different lengths, then step.

The session owns the KV cache (in the backend's native form), the attention mask and each row's next position.
Prompts are left-padded; attention_mask and position_ids follow the reference's rules (cumsum(mask) - 1, padded
slots 1). A step costs one graph run over one new token per active row: nothing grows with the number of steps
except the context that attention reads. Finished rows can be dropped (`keep_rows`), so they stop costing work.
"""

from __future__ import annotations

import numpy as np

from bigcode_deploy.runtime.bundle import Bundle, left_pad, position_ids
from bigcode_deploy.runtime.errors import BigCodeError, ContextOverflow


class DecodingSession:
    """One batch's decoding state over an entered backend: prefill(prompts) -> (B, vocab) float32 logits of each
    row's last position; step(tokens (B,)) -> (B, vocab); keep_rows(mask (B,)) drops finished rows and their cache.
    Raises BigCodeError for a bundle that is not causal-lm with a cache, an empty prompt or an id outside the
    vocabulary; ContextOverflow when the context would exceed n_positions."""

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

    def check_fits(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.n_positions:
            raise ContextOverflow(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
                f"{self.n_positions} positions; shorten the prompt or lower max_new_tokens"
            )

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Run the prompts (left-padded into one batch). Returns each row's last-position logits (B, vocab)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BigCodeError("every prompt needs at least one token")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise BigCodeError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        self.check_fits(prompts, 0)
        input_ids, mask = left_pad(prompts)  # (B, T) each
        logits, self.cache = self.backend.step(
            input_ids, mask, position_ids(mask, 0), self.backend.empty_cache(len(prompts))
        )
        self.attention_mask = mask
        self.next_position = mask.sum(1)  # the next token's position: the count of real tokens so far
        self.rows = np.arange(len(prompts))
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per active row (B,). Returns the next logits (B, vocab)."""
        if self.context_length + 1 > self.n_positions:
            raise ContextOverflow(f"the context is full ({self.n_positions} positions)")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)  # (B, 1)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones_like(tokens)], axis=1)  # (B, P + 1)
        positions = self.next_position[:, None]  # (B, 1)
        logits, self.cache = self.backend.step(tokens, self.attention_mask, positions, self.cache)
        self.next_position = self.next_position + 1
        return logits

    def keep_rows(self, keep: np.ndarray) -> None:
        """Drop the rows where keep is False (their cache too)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return
        index = np.flatnonzero(keep)
        self.cache = self.backend.select_rows(self.cache, index)
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]
        self.rows = self.rows[index]
