"""Shared test helpers: tiny checkpoints written by transformers itself (the oracle), never downloaded."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=101,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=0,
    eos_token_id=0,
    initializer_range=0.2,  # larger than 0.02 so attention is far from uniform and a wrong scale shows
    attn_implementation="eager",
)

HF_CLASSES = {
    "causal-lm": "GPTBigCodeForCausalLM",
    "base": "GPTBigCodeModel",
    "sequence-classification": "GPTBigCodeForSequenceClassification",
    "token-classification": "GPTBigCodeForTokenClassification",
}


def make_hf_model(task: str = "causal-lm", seed: int = 0, **overrides):
    """A random-weight transformers GPTBigCode model (eval mode) for the given task."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPTBigCodeConfig(**{**TINY, **overrides})
    model = getattr(transformers, HF_CLASSES[task])(config).eval()
    # Non-trivial LayerNorm and bias values, so a swapped or skipped tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def left_padded_batch(vocab_size: int, lengths=(7, 4, 2), seed: int = 0, pad_id: int = 0):
    """input_ids (B, T) and attention_mask (B, T) for prompts of different lengths, left padded."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[row, T - n :] = 1
    return ids, mask
