"""The original SantaCoder checkpoint format, read directly: its config and weights mapped onto GPTBigCode on load.

bigcode/santacoder and its fine-tunes ship the model as remote code for transformers: config.json with model_type
"gpt2", architectures ["GPT2LMHeadCustomModel"], attention_head_type "multiquery", an auto_map to
configuration_gpt2_mq.py / modeling_gpt2_mq.py, and GPT-2 module names and weight layouts.

The mapping follows modeling_gpt2_mq.py and configuration_gpt2_mq.py as published on the bigcode/santacoder model
page, revision 094f6ad (2022-12-02; its two earlier revisions 5fb20b0 and 55a1ff8 differ only in the import line of
the config class, and no later commit on main touches the file; the same text is Megatron-LM's
tools/hf_transformers/modeling_gpt2_mq.py). What that code defines, and how each part maps:

- GPT2CustomConfig (model_type "gpt2"): GPT2Config's fields (defaults: activation_function "gelu_new", vocab 50257,
  n_positions 1024, bos/eos 50256) plus attention_head_type, default "multihead". Only "multiquery" replaces the
  attention (GPT2MQAttention); a "multihead" config runs GPT-2's own attention and is refused here, as are
  scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn (the first has no GPTBigCode equivalent, the second
  raises NotImplementedError in that code).
- Module names: GPT2LMHeadCustomModel -> transformer (wte, wpe, h.{i}: ln_1, attn, ln_2, mlp; ln_f) and lm_head
  (tied to wte); GPT2CustomModel is the bare base model. The same names as GPTBigCode except inside attn.
- Weight layout: every projection is transformers' Conv1D, which stores weight as (in_features, out_features), the
  transpose of nn.Linear's. GPT2MQAttention has q_attn = Conv1D(E, E) and kv_attn = Conv1D(2 * head_dim, E)
  (key in the first head_dim output channels, value in the second: `kv_attn(h).split(head_dim, dim=2)`), and
  c_proj = Conv1D(E, E); GPT2MLP has c_fc = Conv1D(n_inner, E) and c_proj = Conv1D(E, n_inner).
  GPTBigCode's MQA c_attn is nn.Linear(E, E + 2 * head_dim) whose output is [query | key | value], so
  c_attn.weight = cat(q_attn.weight.T, kv_attn.weight.T) and c_attn.bias = cat(q_attn.bias, kv_attn.bias); the
  other Conv1D weights are transposed. Query heads are contiguous head_dim blocks of E in both.
- Attention math: scores / sqrt(head_dim) (scale_attn_weights), causal mask from the `bias` buffer, softmax in the
  model's dtype (no fp32 upcast): so the GPTBigCode config gets attention_softmax_in_fp32 = false and
  scale_attention_softmax_in_fp32 = false. The buffers attn.bias and attn.masked_bias that old transformers saved
  are not weights (the loader ignores them).

No original-format oracle runs here: no original checkpoint is downloaded and the remote code is not run. The tests
build an original-format checkpoint from a transformers GPTBigCode one by the inverse of this mapping
(to_original_state_dict), so they prove the two mappings are inverse and that names, shapes and the config mapping
agree with the layout above, not that the layout was read right from the public code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bigcode_deploy.exporter.dtypes import weight_problem
from bigcode_deploy.runtime.errors import CheckpointError, ConfigError
from bigcode_deploy.runtime.manifest_schema import short

SANTACODER_FORMAT = "santacoder-gpt2-mq"  # the manifest's source.format for this format
MULTI_QUERY = "multiquery"
ARCHITECTURES = ("GPT2LMHeadCustomModel", "GPT2CustomModel")
SUPPORTED = (
    "GPTBigCode checkpoints (model_type 'gpt_bigcode') and the original SantaCoder format (model_type 'gpt2', "
    "architectures GPT2LMHeadCustomModel, attention_head_type 'multiquery')"
)

# Conv1D weights stored (in, out): transposed to nn.Linear's (out, in). q_attn/kv_attn are merged into c_attn.
_TRANSPOSED = re.compile(r"^(?P<block>(?:.*\.)?h\.\d+)\.(?P<module>attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_QKV = re.compile(r"^(?P<block>(?:.*\.)?h\.\d+)\.attn\.(?P<part>q_attn|kv_attn)\.(?P<kind>weight|bias)$")


def gpt_bigcode_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The GPTBigCode config dict of an original-format config.json (every other field kept as it is).

    Raises ConfigError (one line naming the field and what is supported) for a gpt2 config that is not the
    multi-query SantaCoder format or uses an option GPTBigCode cannot express."""
    head_type = raw.get("attention_head_type")
    if head_type != MULTI_QUERY:
        architectures = raw.get("architectures")
        raise ConfigError(
            f"config field model_type='gpt2' with attention_head_type={head_type!r} (architectures {architectures!r}) "
            f"is not a format this tool reads; it reads {SUPPORTED}"
        )
    architectures = raw.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not any(a in ARCHITECTURES for a in architectures)
    ):
        raise ConfigError(
            f"config field architectures={short(architectures)} of a gpt2 multi-query config names neither of "
            f"{', '.join(ARCHITECTURES)}: this tool reads {SUPPORTED}"
        )
    for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if raw.get(name):
            raise ConfigError(
                f"config field {name}={raw[name]!r} of the original SantaCoder format is not supported (GPTBigCode "
                "has no equivalent); set it to false"
            )
    fields = dict(raw)
    fields["model_type"] = "gpt_bigcode"
    fields["multi_query"] = True
    fields.setdefault("activation_function", "gelu_new")  # GPT2CustomConfig's default
    fields["attention_softmax_in_fp32"] = False  # GPT2MQAttention's softmax runs in the model's dtype
    fields["scale_attention_softmax_in_fp32"] = False
    return fields


class WeightMapper:
    """Maps an original-format checkpoint's tensors onto GPTBigCode names and layouts, as they are read.

    __call__(tensors) yields (name, tensor) in GPTBigCode's layout; q_attn/kv_attn halves are held until both of a
    layer's parts are read (they may sit in different shards). finish() raises for a half left unpaired.
    Shapes: E = n_embd, D = head_dim, I = n_inner."""

    def __init__(self, n_embd: int, head_dim: int):
        self.n_embd, self.head_dim = n_embd, head_dim
        self.pending: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}

    def __call__(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if (_QKV.match(name) or _TRANSPOSED.match(name)) and (problem := weight_problem(tensor)):
                # Checked before merging or transposing: torch.cat would promote an integer half to float, and an
                # error after mapping would name a tensor the file does not hold.
                raise CheckpointError(f"tensor {name[:120]!r} {problem}")
            if ".attn.c_attn." in name:
                raise CheckpointError(
                    f"tensor {name[:120]!r} has GPTBigCode's fused c_attn layout in an original SantaCoder checkpoint "
                    "(q_attn + kv_attn): re-save it in one layout"
                )
            if match := _QKV.match(name):
                merged = self._qkv_part(match["block"], match["part"], match["kind"], name, tensor)
                if merged is not None:
                    yield merged
            elif match := _TRANSPOSED.match(name):
                if tensor.dim() != 2:
                    raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}: a Conv1D weight is 2-D")
                yield f"{match['block']}.{match['module']}.weight", tensor.t().contiguous()  # (in, out) -> (out, in)
            else:
                yield name, tensor

    def _qkv_part(self, block: str, part: str, kind: str, name: str, tensor: torch.Tensor):
        E, D = self.n_embd, self.head_dim
        expected = {
            ("q_attn", "weight"): (E, E),
            ("kv_attn", "weight"): (E, 2 * D),
            ("q_attn", "bias"): (E,),
            ("kv_attn", "bias"): (2 * D,),
        }[(part, kind)]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} but the original SantaCoder format (Conv1D, stored "
                f"(in, out)) with config.json's sizes implies {expected}: the weights and config.json do not belong "
                "together, or the checkpoint uses another layout"
            )
        parts = self.pending.setdefault((block, kind), {})
        parts[part] = (name, tensor)
        if len(parts) < 2:
            return None
        del self.pending[(block, kind)]
        q, kv = parts["q_attn"][1], parts["kv_attn"][1]
        if kind == "weight":
            return f"{block}.attn.c_attn.weight", torch.cat([q.t(), kv.t()], dim=0).contiguous()  # (E + 2D, E)
        return f"{block}.attn.c_attn.bias", torch.cat([q, kv], dim=0)  # (E + 2D,)

    def finish(self) -> None:
        for (block, kind), parts in self.pending.items():
            (have,) = parts
            missing = "kv_attn" if have == "q_attn" else "q_attn"
            raise CheckpointError(
                f"tensor {block}.attn.{missing}.{kind} is missing while {parts[have][0]} is present: the original "
                "SantaCoder checkpoint is incomplete; re-save it"
            )


def to_original_state_dict(state: dict[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """The inverse mapping, GPTBigCode MQA names/layouts -> original SantaCoder (for tests and conversions).

    c_attn (E + 2D, E) splits into q_attn (E, E) and kv_attn (E, 2D), Conv1D-stored; c_proj/c_fc are transposed."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".attn.c_attn.weight"):
            block = name[: -len(".attn.c_attn.weight")]
            out[f"{block}.attn.q_attn.weight"] = tensor[:n_embd].t().contiguous()
            out[f"{block}.attn.kv_attn.weight"] = tensor[n_embd:].t().contiguous()
        elif name.endswith(".attn.c_attn.bias"):
            block = name[: -len(".attn.c_attn.bias")]
            out[f"{block}.attn.q_attn.bias"] = tensor[:n_embd].clone()
            out[f"{block}.attn.kv_attn.bias"] = tensor[n_embd:].clone()
        elif _TRANSPOSED.match(name):
            out[name] = tensor.t().contiguous()
        else:
            out[name] = tensor
    return out
