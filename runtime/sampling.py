"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty; seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bigcode_deploy.runtime.errors import BigCodeError, ParityError

MAX_SEED = 2**64 - 1  # the C ABI's uint64_t seed: every seed either entry point takes


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value) -> bool:
    """A Python or numpy number, not a bool, that is finite as a float (an int above 1.8e308 is not)."""
    if not (is_integer(value) or isinstance(value, (float, np.floating))):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def shown(value) -> str:
    """A value for an error line: str(value) cut to 40 characters (a hostile one may be megabytes long)."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise BigCodeError(f"{name}={shown(value)} must be a finite number")
        if not is_integer(self.top_k):
            raise BigCodeError(f"top_k={shown(self.top_k)} must be an integer")
        if self.seed is not None and not (is_integer(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise BigCodeError(f"seed={shown(self.seed)} must be an integer in [0, 2**64 - 1]")
        if self.temperature < 0:
            raise BigCodeError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise BigCodeError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise BigCodeError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise BigCodeError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, seen: list, penalty: float) -> np.ndarray:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, tokens in enumerate(seen):
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size:
            values = logits[row, tokens].astype(np.float64)  # float64: a penalty of 1e-300 stays nonzero
            with np.errstate(over="ignore", divide="ignore", under="ignore"):
                penalized = np.where(values > 0, values / penalty, values * penalty)
            finite = np.finfo(logits.dtype)  # a huge or tiny penalty saturates instead of reaching +-inf
            logits[row, tokens] = np.clip(penalized, finite.min, finite.max)
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf. (B, V)."""
    logits = logits.astype(np.float64, copy=True)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        cumulative = np.cumsum(probs, axis=-1)
        remove = cumulative - probs >= top_p  # keep tokens until the mass before them reaches top_p
        sorted_logits[remove] = -np.inf
        np.put_along_axis(logits, order, sorted_logits, axis=-1)
    return logits


class Sampler:
    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, seen: list) -> np.ndarray:
        """Next token per row (B,) from last-position logits (B, V) and each row's tokens so far.

        Raises ParityError when the graph produced a non-finite logit: no token is chosen from NaN."""
        if not np.isfinite(logits).all():
            rows = sorted({int(r) for r in np.argwhere(~np.isfinite(logits))[:, 0]})
            raise ParityError(
                f"the graph produced non-finite logits for batch row(s) {rows}: the bundle is broken; run "
                "`bigcode-deploy verify` on it"
            )
        o = self.options
        logits = apply_repetition_penalty(logits, seen, o.repetition_penalty)
        if o.greedy:
            return logits.argmax(-1).astype(np.int64)
        # Shifted so each row's largest logit is 0 before dividing: a tiny temperature gives -inf, never inf - inf.
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the largest to -inf, as it should
            logits = filter_top_k_top_p(shifted / o.temperature, o.top_k, o.top_p)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
