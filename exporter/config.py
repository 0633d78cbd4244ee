"""GPTBigCode configuration: read from a Hugging Face config.json, validated, with derived fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bigcode_deploy.runtime.bounded_file import read_json
from bigcode_deploy.runtime.errors import ConfigError
from bigcode_deploy.runtime.manifest import MAX_DIM, MAX_LAYERS, MAX_STOP_IDS
from bigcode_deploy.runtime.manifest_schema import is_int, is_number, short

# The activations transformers' ACT2FN maps for this model family; exporter.model implements each.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu", "silu", "swish", "quick_gelu")

# The checkpoint formats config reading knows (recorded as the manifest's source.format).
GPT_BIGCODE_FORMAT = "gpt_bigcode"

# Every field the model or the export reads, by domain; validate() checks each at read, before any weight is loaded.
SIZE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_labels")  # [1, MAX_DIM]
FLAG_FIELDS = (  # JSON booleans only: "false" (a string) or 0 is refused, never read as a truth value
    "scale_attn_weights",
    "use_cache",
    "attention_softmax_in_fp32",
    "scale_attention_softmax_in_fp32",
    "multi_query",
    "tie_word_embeddings",
    "add_cross_attention",
)
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout")  # [0, 1]; classifier_dropout null
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # null or [0, vocab_size); eos also a list
MAX_EOS_IDS = MAX_STOP_IDS  # eos_token_id as a list: at most this many ids (the manifest's bound)
MAX_CONFIG_BYTES = 8 << 20  # config.json (StarCoder's: 1 kB; an id2label of 100k labels: ~3 MB)
CONFIG_FIX = "fix or re-save the checkpoint's config.json"

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
        # Not dataclass fields (no part of the model's definition), set by from_dict: every other field of
        # config.json, kept for the manifest, and the checkpoint format it was read from (SOURCE_FORMATS).
        self.extra: dict[str, Any] = {}
        self.source_format: str = GPT_BIGCODE_FORMAT
        self.validate()
        if self.n_inner is None:  # transformers' default, derived once the sizes are known to be integers
            self.n_inner = 4 * self.n_embd

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
        """Every field's type and range (see SIZE_FIELDS and below). Raises ConfigError naming the field, its value
        and the domain; n_inner may be null (4 * n_embd)."""
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            hi = MAX_LAYERS if name == "n_layer" else MAX_DIM
            if not (name == "n_inner" and value is None) and not is_int(value, 1, hi):
                raise ConfigError(
                    f"config field {name}={short(value)} must be an integer in [1, {hi}]"
                    + (" or null (4 * n_embd)" if name == "n_inner" else "")
                )
        for name in FLAG_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(
                    f"config field {name}={short(value)} must be true or false (a JSON boolean, not a string or number)"
                )
        eps = self.layer_norm_epsilon
        if not is_number(eps) or not 0 < eps < 1:
            raise ConfigError(
                f"config field layer_norm_epsilon={short(eps)} must be a number in (0, 1): set it to 1e-05, "
                "transformers' default and StarCoder's and SantaCoder's value"
            )
        for name in DROPOUT_FIELDS:
            value = getattr(self, name)
            if not (name == "classifier_dropout" and value is None) and not (is_number(value) and 0 <= value <= 1):
                raise ConfigError(f"config field {name}={short(value)} must be a probability in [0, 1]")
        if not is_number(self.initializer_range) or self.initializer_range < 0:
            raise ConfigError(f"config field initializer_range={short(self.initializer_range)} must be a number >= 0")
        if self.torch_dtype is not None and not (isinstance(self.torch_dtype, str) and len(self.torch_dtype) <= 200):
            raise ConfigError(f"config field torch_dtype={short(self.torch_dtype)} must be a dtype name or null")
        self._validate_token_ids()
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"config field n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "fix hidden_size/num_attention_heads in config.json"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"config field activation_function={short(self.activation_function)} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.add_cross_attention:
            raise ConfigError(
                "config field add_cross_attention=True is not supported: GPTBigCode decoders here are "
                "self-attention only; set it to false"
            )

    def _validate_token_ids(self) -> None:
        vocab = self.vocab_size
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            many = name == "eos_token_id" and isinstance(value, (list, tuple))
            ids = value if many else [value]
            if not (0 < len(ids) <= MAX_EOS_IDS and all(is_int(i, 0, vocab - 1) for i in ids)):
                raise ConfigError(
                    f"config field {name}={short(value)} must be a token id in [0, {vocab}) (vocab_size)"
                    + (f", a list of 1 to {MAX_EOS_IDS} of them," if name == "eos_token_id" else "")
                    + " or null"
                )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPTBigCodeConfig:
        """A config from a config.json dict: GPTBigCode (model_type gpt_bigcode), or the original SantaCoder format
        (model_type gpt2 with attention_head_type multiquery, read by exporter.santacoder_format). Fields the model
        does not use are kept in `extra` (the manifest records them). Raises ConfigError naming the field."""
        model_type = raw.get("model_type")
        source_format = GPT_BIGCODE_FORMAT
        if model_type == "gpt2":
            from bigcode_deploy.exporter.santacoder_format import SANTACODER_FORMAT, gpt_bigcode_fields

            raw, source_format = gpt_bigcode_fields(raw), SANTACODER_FORMAT
        elif model_type != "gpt_bigcode":
            raise ConfigError(
                f"config field model_type={model_type!r} is not supported: this tool reads GPTBigCode checkpoints "
                "(model_type 'gpt_bigcode') and the original SantaCoder format (model_type 'gpt2', "
                "GPT2LMHeadCustomModel, attention_head_type 'multiquery')"
            )
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            canonical = ALIASES.get(key, key)
            if canonical in fields:
                values[canonical] = value
            elif key != "model_type":
                extra[key] = value
        # transformers derives num_labels from id2label when present.
        if "num_labels" not in raw and isinstance(raw.get("id2label"), dict):
            values["num_labels"] = len(raw["id2label"])
        config = cls(**values)
        config.extra, config.source_format = extra, source_format
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTBigCodeConfig:
        """Read and validate config.json (runtime.bounded_file bounds the read). Raises ConfigError, one line naming the
        file, for a file that cannot be read as a JSON object or a field outside its domain (validate)."""
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"{path} not found: a model directory needs a Hugging Face config.json")
        raw = read_json(path, limit=MAX_CONFIG_BYTES, error=ConfigError, fix=CONFIG_FIX)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}: {CONFIG_FIX}")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self, extra: bool = True) -> dict[str, Any]:
        """The HF-style GPTBigCode dict: model_type plus every model field (round-trips through from_dict), and with
        `extra` every other field config.json held (architectures, auto_map, ...; the model's fields win)."""
        model = {"model_type": "gpt_bigcode", **dataclasses.asdict(self)}
        return {**self.extra, **model} if extra else model


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
