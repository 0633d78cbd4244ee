"""GPTBigCode configuration: read from a Hugging Face config.json, validated, with derived fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bigcode_deploy.runtime.errors import ConfigError

# The activations transformers' ACT2FN maps for this model family; exporter.model implements each.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu", "silu", "swish", "quick_gelu")

# transformers' attribute_map for GPTBigCodeConfig: alias -> canonical field.
ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


@dataclasses.dataclass
class GPTBigCodeConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_pytorch_tanh"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    attention_softmax_in_fp32: bool = True
    scale_attention_softmax_in_fp32: bool = True
    multi_query: bool = True
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False
    num_labels: int = 2
    classifier_dropout: float | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        self.validate()

    # Derived fields: computed, never stored twice.
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"config field n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "fix hidden_size/num_attention_heads in config.json"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"config field activation_function={self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.add_cross_attention:
            raise ConfigError(
                "config field add_cross_attention=True is not supported: GPTBigCode decoders here are "
                "self-attention only; set it to false"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPTBigCodeConfig:
        model_type = raw.get("model_type")
        if model_type != "gpt_bigcode":
            raise ConfigError(
                f"config field model_type={model_type!r} is not 'gpt_bigcode': this tool exports GPTBigCode "
                "(SantaCoder/StarCoder) checkpoints only"
            )
        values: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            key = ALIASES.get(key, key)
            if key in fields:
                values[key] = value
        # transformers derives num_labels from id2label when present.
        if "num_labels" not in raw and isinstance(raw.get("id2label"), dict):
            values["num_labels"] = len(raw["id2label"])
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTBigCodeConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model directory needs a Hugging Face config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-save the checkpoint's config.json") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The HF-style dict: model_type plus every field (round-trips through from_dict)."""
        return {"model_type": "gpt_bigcode", **dataclasses.asdict(self)}


# Named presets with the public shapes (random weights only: used by benchmarks and slow tests).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny_starcoder_py": dict(
        vocab_size=49152,
        n_positions=8192,
        n_embd=768,
        n_layer=20,
        n_head=12,
        n_inner=3072,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "santacoder": dict(
        vocab_size=49280,
        n_positions=2048,
        n_embd=2048,
        n_layer=24,
        n_head=16,
        n_inner=8192,
        bos_token_id=49152,
        eos_token_id=49152,
    ),
}


def preset(name: str, **overrides: Any) -> GPTBigCodeConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTBigCodeConfig(**{**PRESETS[name], **overrides})
