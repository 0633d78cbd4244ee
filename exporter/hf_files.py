"""The Hugging Face files a causal-lm bundle carries beside its graph: config.json and generation_config.json.

With them, Optimum's `ORTModelForCausalLM.from_pretrained(bundle_dir)` (package optimum-onnx; optimum.onnxruntime)
loads a bundle directory as it is. What Optimum reads, and why each file is written the way it is:

- model.onnx: found by name (Optimum's standard file name, which is also the bundle's GRAPH_FILE). Optimum takes the
  graph's I/O as the bundle defines it (input_ids, attention_mask, position_ids, past_key_values.{i}.key_value ->
  logits, present.{i}.key_value) and detects the fused K|V cache of transformers < 4.54 by the input name
  `past_key_values.0.key_value`: it feeds the first step with empty pasts of shape (batch, 0, 2 * head_dim) (MQA) or
  (batch, heads, 0, 2 * head_dim) (MHA), and derives position_ids from attention_mask as transformers does.
- config.json: read with transformers' AutoConfig, so it must be a transformers-loadable GPTBigCode config. Optimum
  needs model_type "gpt_bigcode" (it selects the cache layout), multi_query (MQA or MHA past shape), n_embd and n_head
  (head_dim); GenerationMixin reads the token ids. It is written from the validated GPTBigCodeConfig the graph was
  built from (config.to_dict(extra=False): model_type plus every model field, aliases canonical; for the original
  SantaCoder format, the GPTBigCode config it maps to), not copied from the checkpoint:
  the bundle's config then describes its graph (use_cache says whether the graph has a cache; architectures names
  the causal-lm head), it holds no field this exporter ignored (auto_map remote code, timm/diffusers markers that
  would make Optimum infer another library, generation parameters that Optimum moves with a warning), and writing it
  needs no transformers. Optimum itself sets config.use_cache from its `use_cache` argument (default True), so a
  bundle exported without a cache loads with `from_pretrained(bundle_dir, use_cache=False)`.
- generation_config.json: read with GenerationConfig.from_pretrained (Optimum falls back to one derived from
  config.json when absent). The checkpoint's is copied unchanged when it has one (it holds the model's decoding
  defaults); otherwise a minimal one holds bos/eos/pad token ids of the config. Its eos_token_id (an id or a list)
  becomes the manifest's stop_token_ids (stop_token_ids below), which the runtime stops on by default.

Other tasks (base, sequence/token classification) get no Hugging Face files. Nothing here imports transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bigcode_deploy.exporter.config import MAX_CONFIG_BYTES, GPTBigCodeConfig
from bigcode_deploy.runtime.bounded_file import read_json
from bigcode_deploy.runtime.errors import ConfigError
from bigcode_deploy.runtime.manifest import GENERATION_CONFIG_FILE, GRAPH_DTYPES, HF_CONFIG_FILE, MAX_STOP_IDS
from bigcode_deploy.runtime.manifest_schema import short

# The tasks whose bundles carry the Hugging Face files, and the transformers class each one's graph corresponds to.
ARCHITECTURES = {"causal-lm": "GPTBigCodeForCausalLM"}


def hf_config(config: GPTBigCodeConfig, task: str, cache: bool, dtype: str | None = None) -> dict[str, Any]:
    """The config.json dict of a bundle's graph (transformers' GPTBigCodeConfig accepts every key); torch_dtype is
    the graph's dtype (fp16 -> "float16") when given, not the checkpoint's."""
    raw = config.to_dict(extra=False)  # the model's fields only: no auto_map, no other format's architectures
    raw["architectures"] = [ARCHITECTURES[task]]
    raw["use_cache"] = cache
    if dtype is not None:
        raw["torch_dtype"] = GRAPH_DTYPES[dtype]
    return raw


def generation_config(config: GPTBigCodeConfig) -> dict[str, Any]:
    """A minimal generation_config.json: the special token ids the config sets."""
    return {
        name: getattr(config, name)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, name) is not None
    }


def stop_token_ids(source_dir: Path, config: GPTBigCodeConfig) -> list[int]:
    """The ids that end generation by default (the manifest's stop_token_ids), as transformers decides them: the
    checkpoint's generation_config.json eos_token_id when the file sets it (an int, or a list: any of them stops; null:
    none), else config.json's eos_token_id. Raises ConfigError (one line) for a file that is not JSON or an id that is
    not a token id in [0, vocab_size)."""
    path = Path(source_dir) / GENERATION_CONFIG_FILE
    eos, where = config.eos_token_id, f"{HF_CONFIG_FILE} field eos_token_id"
    if path.exists() or path.is_symlink():
        generation = read_json(path, limit=MAX_CONFIG_BYTES, error=ConfigError, fix="re-save the checkpoint's file")
        if not isinstance(generation, dict):
            raise ConfigError(f"{path} holds a JSON {type(generation).__name__}, not an object; re-save the file")
        if "eos_token_id" in generation:
            eos, where = generation["eos_token_id"], f"{path} field eos_token_id"
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if len(ids) > MAX_STOP_IDS:
        raise ConfigError(f"{where} lists {len(ids)} ids; at most {MAX_STOP_IDS} stop ids are supported: fix the file")
    for token in ids:
        if type(token) is not int or not 0 <= token < config.vocab_size:  # noqa: E721 (bool is not an id)
            raise ConfigError(
                f"{where}={short(eos)} holds {short(token)}, not a token id in [0, {config.vocab_size}): fix the file"
            )
    return list(dict.fromkeys(ids))  # once each, in the file's order


def write_hf_files(
    source_dir: Path,
    staging: Path,
    config: GPTBigCodeConfig,
    task: str,
    *,
    cache: bool | None = None,
    dtype: str | None = None,
) -> list[str]:
    """Write config.json and generation_config.json into the staging bundle; return the names written.

    cache: whether the graph has a KV cache (its use_cache in config.json); None means the export default
    (causal-lm graphs are exported with a cache).
    """
    if task not in ARCHITECTURES:
        return []
    source_dir, staging = Path(source_dir), Path(staging)
    if cache is None:
        cache = True
    _write_json(staging / HF_CONFIG_FILE, hf_config(config, task, cache, dtype))
    if (source_dir / GENERATION_CONFIG_FILE).is_file():
        shutil.copy2(source_dir / GENERATION_CONFIG_FILE, staging / GENERATION_CONFIG_FILE)
    else:
        _write_json(staging / GENERATION_CONFIG_FILE, generation_config(config))
    return [HF_CONFIG_FILE, GENERATION_CONFIG_FILE]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
