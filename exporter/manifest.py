"""manifest.json: the bundle's contract. Everything needed to drive the graph, in Python or C++, is in it.

Written here from the config and export options; read by runtime/ (and by services) without importing exporter/.
"""

from __future__ import annotations

from typing import Any

from exporter.config import GPTBigCodeConfig
from exporter.ops import DOMAIN, DOMAIN_VERSION, KV_CACHE_MERGE, MASKED_SOFTMAX

FORMAT = "bigcode-deploy-bundle"
FORMAT_VERSION = 1
TASKS_WITH_CACHE = ("causal-lm", "base")

ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Symbolic dimension names used in the graph and the manifest.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "past_sequence + sequence"


def past_name(layer: int) -> str:
    return f"past_key_values.{layer}.key_value"


def present_name(layer: int) -> str:
    return f"present.{layer}.key_value"


def has_cache(task: str, use_cache: bool) -> bool:
    return use_cache and task in TASKS_WITH_CACHE


def cache_shape(config: GPTBigCodeConfig, length: str) -> list[str | int]:
    """MQA (batch, length, 2*head_dim); MHA (batch, n_head, length, 2*head_dim)."""
    heads = [] if config.multi_query else [config.n_head]
    return [BATCH, *heads, length, 2 * config.head_dim]


def io_spec(config: GPTBigCodeConfig, task: str, dtype: str, use_cache: bool) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs: name, dtype, symbolic shape, in graph order."""
    float_dtype = ONNX_DTYPE_NAMES[dtype]
    cache = has_cache(task, use_cache)
    mask_len = TOTAL if cache else SEQUENCE
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]},
        {"name": "attention_mask", "dtype": "int64", "shape": [BATCH, mask_len]},
    ]
    if task in TASKS_WITH_CACHE:
        inputs.append({"name": "position_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]})
    if cache:
        inputs += [{"name": past_name(i), "dtype": float_dtype, "shape": cache_shape(config, PAST)}
                   for i in range(config.n_layer)]
    main = {
        "causal-lm": {"name": "logits", "dtype": float_dtype, "shape": [BATCH, SEQUENCE, config.vocab_size]},
        "base": {"name": "last_hidden_state", "dtype": float_dtype, "shape": [BATCH, SEQUENCE, config.n_embd]},
        "sequence-classification": {"name": "logits", "dtype": float_dtype, "shape": [BATCH, config.num_labels]},
        "token-classification": {"name": "logits", "dtype": float_dtype, "shape": [BATCH, SEQUENCE, config.num_labels]},
    }[task]
    outputs = [main]
    if cache:
        outputs += [{"name": present_name(i), "dtype": float_dtype, "shape": cache_shape(config, TOTAL)}
                    for i in range(config.n_layer)]
    return inputs, outputs


def dims(config: GPTBigCodeConfig, cache: bool) -> dict[str, dict[str, Any]]:
    """Range of every symbolic dim (max None: unbounded). A TensorRT profile or a service's checks read these."""
    n = config.n_positions
    out = {BATCH: {"min": 1, "max": None}, SEQUENCE: {"min": 1, "max": n}}
    if cache:
        out[PAST] = {"min": 0, "max": n - 1}
        out[TOTAL] = {"min": 1, "max": n}
    return out


def kv_cache_section(config: GPTBigCodeConfig, dtype: str) -> dict[str, Any]:
    D = config.head_dim
    return {
        "layout": "merged_key_value",
        "num_layers": config.n_layer,
        "multi_query": config.multi_query,
        "num_kv_heads": config.kv_heads,
        "head_dim": D,
        "dtype": ONNX_DTYPE_NAMES[dtype],
        "past_input": "past_key_values.{layer}.key_value",
        "present_output": "present.{layer}.key_value",
        "past_shape": cache_shape(config, PAST),
        "present_shape": cache_shape(config, TOTAL),
        "sequence_axis": 1 if config.multi_query else 2,
        "key_slice": [0, D],
        "value_slice": [D, 2 * D],
        "first_step": "feed every past with past_sequence = 0 (an empty tensor)",
        "next_step": "each present.{layer}.key_value becomes past_key_values.{layer}.key_value",
    }


def feeding_rules(cache: bool) -> dict[str, str]:
    rules = {
        "input_ids": "token ids in [0, vocab_size); pad slots may hold any valid id",
        "attention_mask": "1 for a real token, 0 for padding; left padding for generation"
        + (", covering past and new tokens (length past_sequence + sequence)" if cache else ""),
    }
    if cache:
        rules["position_ids"] = (
            "cumsum(attention_mask, axis=1) - 1 with padded slots set to 1, sliced to the new tokens' columns"
        )
    return rules


def custom_ops_section() -> dict[str, Any]:
    return {
        "domain": DOMAIN,
        "version": DOMAIN_VERSION,
        "ops": {
            MASKED_SOFTMAX: {
                "inputs": ["scores", "mask"], "outputs": ["probs"],
                "attributes": {"scale": "float", "mask_value": "float", "softmax_dtype": "int (TensorProto type)"},
            },
            KV_CACHE_MERGE: {
                "inputs": ["past", "key_value"], "outputs": ["present", "key", "value"],
                "attributes": {"head_dim": "int"},
            },
        },
        "reference_bodies": "model-local FunctionProtos of standard ONNX ops",
    }


def build_manifest(
    config: GPTBigCodeConfig, *, task: str, dtype: str, opset: int, use_cache: bool, package_version: str,
    graph: dict[str, Any], source: dict[str, Any], tokenizer: str | None, custom_ops_used: list[str],
) -> dict[str, Any]:
    inputs, outputs = io_spec(config, task, dtype, use_cache)
    cache = has_cache(task, use_cache)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version,
        "target": "portable",
        "task": task,
        "dtype": dtype,
        "opset": opset,
        "config": config.to_dict(),
        "graph": graph,
        "inputs": inputs,
        "outputs": outputs,
        "dims": dims(config, cache),
        "kv_cache": kv_cache_section(config, dtype) if cache else None,
        "feeding": feeding_rules(cache),
        "custom_ops": {**custom_ops_section(), "used": custom_ops_used},
        "tokenizer": tokenizer,
        "source": source,
        "passes": [],
    }
    return manifest
