"""The reference GPTBigCode model, as transformers < 4.54 defines it (one merged K|V cache tensor per layer).

Module and parameter names match the checkpoint's (wte, wpe, h.N.ln_1, attn.c_attn, ...), so loading is a
one-to-one key copy. The two signature optimizations of the model are small free functions,
`fused_masked_softmax` and `merge_kv_cache` (exporter.ops): in eager mode they compute the math, and under
torch.onnx.export they emit one `bigcode::` custom node each, so the exported graph keeps them visible.

Shapes: B batch, T new tokens, P past tokens, S = P + T keys, H heads, D head_dim, E = H * D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.ops import fused_masked_softmax, merge_kv_cache
from bigcode_deploy.runtime.errors import ConfigError

KVCache = list[torch.Tensor]  # per layer: MQA (B, S, 2D); MHA (B, H, S, 2D)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACT_FNS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class GPTBigCodeAttention(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        super().__init__()
        self.multi_query = config.multi_query
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.scale_attn_weights = config.scale_attn_weights
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32
        self.scale_attention_softmax_in_fp32 = (
            config.scale_attention_softmax_in_fp32 and config.attention_softmax_in_fp32
        )
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * config.kv_dim)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def softmax_scaling(self, dtype: torch.dtype) -> tuple[torch.dtype, float, float]:
        """(softmax dtype, factor on Q before QK^T, factor after the upcast): the seed's per-layer unscale.

        In fp16/bf16 with an fp32 softmax, scores are divided by (layer_idx + 1) before the matmul so they stay
        small, and multiplied back in fp32. In an fp32 model there is no unscale.
        """
        softmax_dtype = torch.float32 if self.attention_softmax_in_fp32 else dtype
        upcast = dtype != softmax_dtype
        unscale = float(self.layer_idx + 1) if (self.scale_attention_softmax_in_fp32 and upcast) else 1.0
        query_scale = 1.0 / unscale
        if self.scale_attn_weights:
            query_scale /= math.sqrt(self.head_dim)
        return softmax_dtype, query_scale, unscale

    def forward(
        self, hidden_states: torch.Tensor, layer_past: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, E = hidden_states.shape
        H, D = self.n_head, self.head_dim
        qkv = self.c_attn(hidden_states)  # MQA (B, T, E + 2D); MHA (B, T, 3E)
        if self.multi_query:
            query, key_value = qkv.split((E, 2 * D), dim=2)  # (B, T, E), (B, T, 2D)
        else:
            # Per head [q | k | v] interleaved: memory layout (H, 3, D), not GPT-2's (3, H, D).
            query, key_value = (
                qkv.view(B, T, H, 3 * D).transpose(1, 2).split((D, 2 * D), dim=3)
            )  # (B, H, T, D), (B, H, T, 2D)
        present, key, value = merge_kv_cache(layer_past, key_value, D)  # (.., S, 2D), (.., S, D), (.., S, D)

        softmax_dtype, query_scale, unscale = self.softmax_scaling(query.dtype)
        query = query * query_scale
        if self.multi_query:
            # Heads folded into the query rows: one K/V head shared by all, never expanded.
            scores = torch.matmul(query.reshape(B, T * H, D), key.transpose(-1, -2))  # (B, T*H, S)
            scores = scores.view(B, T, H, -1)  # (B, T, H, S); mask is (B, T, 1, S)
            probs = fused_masked_softmax(scores, attention_mask, unscale, softmax_dtype)
            attn_output = torch.matmul(probs.view(B, T * H, -1), value).view(B, T, E)  # (B, T*H, D) -> (B, T, E)
        else:
            scores = torch.matmul(query, key.transpose(-1, -2))  # (B, H, T, S); mask is (B, 1, T, S)
            probs = fused_masked_softmax(scores, attention_mask, unscale, softmax_dtype)
            attn_output = torch.matmul(probs, value).transpose(1, 2).reshape(B, T, E)  # (B, H, T, D) -> (B, T, E)
        return self.c_proj(attn_output), present


class GPTBigCodeMLP(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACT_FNS[config.activation_function]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden_states)))


class GPTBigCodeBlock(nn.Module):
    def __init__(self, config: GPTBigCodeConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, layer_past: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_output, present = self.attn(self.ln_1(hidden_states), layer_past, attention_mask)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present


def default_position_ids(attention_mask: torch.Tensor | None, past_length: int, seq_length: int) -> torch.Tensor:
    """transformers 4.53's rule: from the mask when given (padded slots get 1), else past_length + arange."""
    if attention_mask is not None:
        position_ids = attention_mask.long().cumsum(-1) - 1  # (B, P + T)
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        return position_ids[:, past_length : past_length + seq_length]  # (B, T)
    return torch.arange(past_length, past_length + seq_length, dtype=torch.long).unsqueeze(0)  # (1, T)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    past_length: int | torch.SymInt,
    seq_length: int | torch.SymInt,
    device: torch.device,
    multi_query: bool,
) -> torch.Tensor:
    """Causal AND padding mask, built once per forward and shared by every layer.

    Returns bool (B or 1, T, 1, S) for MQA, (B or 1, 1, T, S) for MHA. Causality is computed from positions
    (key index <= past_length + query index) rather than sliced from an (n_positions, n_positions) buffer.
    """
    key_length = past_length + seq_length
    query_index = torch.arange(seq_length, device=device) + past_length  # (T,)
    key_index = torch.arange(key_length, device=device)  # (S,)
    mask = (key_index[None, :] <= query_index[:, None])[None]  # (1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()  # (B, T, S)
    return mask.unsqueeze(2 if multi_query else 1)


class GPTBigCodeModel(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([GPTBigCodeBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, T); attention_mask (B, P + T) of 1/0; position_ids (B, T); past: a tensor per layer.

        Returns last_hidden_state (B, T, E) and the presents (past + new K|V per layer).
        """
        B, T = input_ids.shape
        past_length = past_key_values[0].size(-2) if past_key_values else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_length, T).to(input_ids.device)
        mask = build_attention_mask(attention_mask, past_length, T, input_ids.device, self.config.multi_query)
        hidden_states = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, E)
        presents: KVCache = []
        for i, block in enumerate(self.h):
            layer_past = past_key_values[i] if past_key_values else None
            hidden_states, present = block(hidden_states, layer_past, mask)
            presents.append(present)
        return self.ln_f(hidden_states), presents


class GPTBigCodeForCausalLM(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTBigCodeModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Returns logits (B, T, vocab) and the presents."""
        hidden_states, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values)
        return self.lm_head(hidden_states), presents


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor:
    """Index of each row's pooled token (B,), for left or right padding: transformers 4.53's rule.

    With pad_token_id set: the rightmost token that is not pad_token_id (so a text ending in pad ids, e.g. eos used
    as pad, pools before them, as the classifier was trained); a slot the attention_mask marks 0 counts as padding
    whatever id it holds, which gives transformers' result for its own inputs (pad slots hold pad_token_id). A row
    of pad ids only pools at 0, as in transformers. Without pad_token_id: the last position the attention_mask marks
    real (transformers takes the last position and refuses a batch > 1 there). pad_token_id is a config constant,
    so an exported graph computes this from input_ids and attention_mask with no other input.
    """
    B, T = input_ids.shape
    if pad_token_id is not None:
        real = (input_ids != pad_token_id).to(torch.int64)  # (B, T)
        if attention_mask is not None:
            real = real * attention_mask.to(torch.int64)
    elif attention_mask is not None:
        real = attention_mask.to(torch.int64)
    elif B == 1:
        return torch.full((1,), T - 1, dtype=torch.long, device=input_ids.device)
    else:
        raise ConfigError(
            "sequence classification of a batch > 1 needs an attention_mask or config.pad_token_id to find each "
            "row's last token"
        )
    positions = torch.arange(T, device=input_ids.device, dtype=torch.int64)  # (T,)
    return (positions * real).argmax(-1)  # (B,)


class GPTBigCodeForSequenceClassification(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTBigCodeModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Returns logits (B, num_labels) pooled at each row's last real token, and the presents."""
        hidden_states, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.score(hidden_states)  # (B, T, num_labels)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)  # (B,)
        pooled = logits[torch.arange(input_ids.shape[0], device=logits.device), last]  # (B, num_labels)
        return pooled, presents


class GPTBigCodeForTokenClassification(nn.Module):
    def __init__(self, config: GPTBigCodeConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTBigCodeModel(config)
        # transformers applies dropout (classifier_dropout) here; it is inactive at inference.
        self.classifier = nn.Linear(config.n_embd, config.num_labels)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Returns logits (B, T, num_labels) and the presents."""
        hidden_states, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values)
        return self.classifier(hidden_states), presents


TASKS: dict[str, type[nn.Module]] = {
    "causal-lm": GPTBigCodeForCausalLM,
    "base": GPTBigCodeModel,
    "sequence-classification": GPTBigCodeForSequenceClassification,
    "token-classification": GPTBigCodeForTokenClassification,
}


def build_model(config: GPTBigCodeConfig, task: str = "causal-lm") -> nn.Module:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task](config)


def init_weights(model: nn.Module, config: GPTBigCodeConfig, seed: int) -> nn.Module:
    """transformers' initialisation (normal(0, initializer_range), c_proj scaled by layers), seeded."""
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module_std = std / math.sqrt(2 * config.n_layer) if name.endswith("c_proj") else std
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * module_std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
