"""Running the torch reference model directly (the ground truth every backend is compared with)."""

from __future__ import annotations

import torch

from bigcode_deploy.exporter.checkpoint import load_model
from bigcode_deploy.runtime.errors import BigCodeError


def next_token_candidates(
    model_dir, token_ids: list[int], top: int = 5, dtype: str = "fp32"
) -> list[tuple[int, float]]:
    """The `top` most likely next tokens after `token_ids`, with their logits."""
    model, config = load_model(model_dir, task="causal-lm", dtype=dtype)
    if not token_ids:
        raise BigCodeError("the prompt is empty: give at least one token id")
    bad = [t for t in token_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise BigCodeError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    if len(token_ids) > config.n_positions:
        raise BigCodeError(f"the prompt has {len(token_ids)} tokens; the model's context is {config.n_positions}")
    with torch.no_grad():
        logits, _ = model(torch.tensor([token_ids]))
    values, indices = logits[0, -1].float().topk(min(top, config.vocab_size))
    return [(int(i), float(v)) for v, i in zip(values, indices)]
