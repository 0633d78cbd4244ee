"""manifest.json: the bundle's contract, owned here. Everything needed to drive a graph, in Python or C++, is in it.

One typed Manifest with build (from a model config and export options), derive (a lowered or quantized copy),
read (from a bundle directory, validated) and validate. Every constant of the format is defined once, here: the
file names, the symbolic dims, the cache I/O name templates, the dtype table, the custom-op domain, the tasks,
targets and backends that the CLI offers as choices.

Format: JSON, `format` = FORMAT, `format_version` = FORMAT_VERSION; a reader refuses any other version. The graph's
I/O names follow Hugging Face Optimum's ONNX export of GPTBigCode (input_ids, attention_mask, position_ids,
past_key_values.{layer}.key_value -> logits, present.{layer}.key_value), whose merged K|V cache layout is
transformers' (< 4.54) GPTBigCode cache: MQA (batch, sequence, 2 * head_dim), MHA (batch, heads, sequence, 2 *
head_dim), keys in the first head_dim channels and values in the second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bigcode_deploy.runtime.bounded_file import read_json
from bigcode_deploy.runtime.errors import BundleError

FORMAT = "bigcode-deploy-bundle"
FORMAT_VERSION = 2  # 2: reference outputs, pass reasons, Hugging Face config files; 1 is refused (re-export)

# Files of a bundle directory.
MANIFEST_FILE = "manifest.json"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PARITY_FILE = "parity.json"
REFERENCE_FILE = "reference_outputs.safetensors"
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Copied from the checkpoint when present (Hugging Face tokenizer files; tokenizer.json is what the runtime reads).
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
ENGINE_DIR = "engine"
# What `optimize` writes itself; every other file of the input bundle is copied as it is.
GRAPH_OUTPUT_FILES = frozenset({GRAPH_FILE, DATA_FILE, MANIFEST_FILE, PARITY_FILE})

# Symbolic dimension names, in the graph and in the manifest.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "past_sequence + sequence"
PAST_INPUT = "past_key_values.{layer}.key_value"
PRESENT_OUTPUT = "present.{layer}.key_value"

# Graph dtypes: the CLI's name -> the manifest's tensor dtype name. Tensor dtype name -> numpy dtype.
GRAPH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64}
ONNX_TENSOR_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int64": 7}  # TensorProto.DataType (onnx.proto)

TASKS = ("causal-lm", "base", "sequence-classification", "token-classification")
TASKS_WITH_CACHE = ("causal-lm", "base")
TARGETS = ("portable", "ort", "tensorrt")
BACKENDS = ("ort", "ort-cuda", "torch", "tensorrt")  # torch: the reference model, provided by bigcode_deploy.exporter
QUANTIZATION_BITS = {"int8": 8, "int4": 4}  # weight-only schemes -> MatMulNBits bits
QUANTIZATION_SCHEMES = tuple(QUANTIZATION_BITS)
# Where the attention scale sits: "softmax-unscale" (the export's: Q carries 1/(u*sqrt(head_dim)) and the fp32 softmax
# multiplies by u = layer + 1 in half precision, u = 1 in fp32); "query" (all of 1/sqrt(head_dim) on Q before QK^T,
# softmax scale 1: the form TensorRT fuses; graphs/scale_on_query.py).
ATTENTION_SCALE_FORMS = ("softmax-unscale", "query")
OPSETS = range(18, 24)

# Bounds on what a manifest may describe (a bundle is untrusted input: checked before anything is built from it).
MAX_MANIFEST_BYTES = 16 << 20  # manifest.json itself; a 40-layer manifest takes ~20 kB
MAX_LAYERS = 1024  # n_layer (StarCoder: 40): the manifest lists two tensors per layer
MAX_DIM = 2**31 - 1  # vocab_size, n_positions, n_embd, n_head, n_inner, num_labels, dims: int32 sizes
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json (StarCoder's: 2 MB)
MAX_STOP_IDS = 64  # stop_token_ids / eos_token_id as a list (transformers' checkpoints: 1-3)

# The custom domain of the model's two signature optimizations (bigcode_deploy.exporter.ops emits them).
DOMAIN = "bigcode"
DOMAIN_VERSION = 1
MASKED_SOFTMAX = "FusedMaskedSoftmax"
KV_CACHE_MERGE = "KVCacheMerge"
CUSTOM_OPS = {
    MASKED_SOFTMAX: {
        "inputs": ["scores", "mask"],
        "outputs": ["probs"],
        "attributes": {"scale": "float", "mask_value": "float", "softmax_dtype": "int (TensorProto type)"},
    },
    KV_CACHE_MERGE: {
        "inputs": ["past", "key_value"],
        "outputs": ["present", "key", "value"],
        "attributes": {"head_dim": "int"},
    },
}


def past_name(layer: int) -> str:
    return PAST_INPUT.format(layer=layer)


def present_name(layer: int) -> str:
    return PRESENT_OUTPUT.format(layer=layer)


def has_cache(task: str, use_cache: bool) -> bool:
    return use_cache and task in TASKS_WITH_CACHE


@dataclass
class TensorSpec:
    """One graph input or output: its name, tensor dtype name (NUMPY_DTYPES' keys) and symbolic shape."""

    name: str
    dtype: str
    shape: list[str | int]


@dataclass
class GraphFiles:
    file: str
    external_data: str | None
    sha256: dict[str, str]  # file name -> hex digest, for the graph and its external data

    @property
    def names(self) -> list[str]:
        return [self.file] + ([self.external_data] if self.external_data else [])


@dataclass
class KVCache:
    """The merged K|V cache: how to feed the first step and carry presents into the next."""

    num_layers: int
    multi_query: bool
    num_kv_heads: int
    head_dim: int
    dtype: str
    past_shape: list[str | int]
    present_shape: list[str | int]
    sequence_axis: int
    layout: str = "merged_key_value"
    past_input: str = PAST_INPUT
    present_output: str = PRESENT_OUTPUT
    key_slice: list[int] = field(default_factory=list)
    value_slice: list[int] = field(default_factory=list)
    first_step: str = "feed every past with past_sequence = 0 (an empty tensor)"
    next_step: str = "each present.{layer}.key_value becomes past_key_values.{layer}.key_value"


@dataclass
class PassRecord:
    """A graph pass as applied: how often it fired and, when it fired 0 times, why."""

    name: str
    count: int
    reason: str | None = None


@dataclass
class ReferenceRecord:
    """The torch reference's teacher-forced outputs stored in the bundle (REFERENCE_FILE), hashed.

    prompts: the left-padded batch's token ids; steps: cached decode steps after the prefill, whose tokens are the
    reference's greedy choices (stored as `tokens`); dtype: the reference's dtype (always fp32); model_dtype: the
    dtype of the torch model whose own error to the fp32 reference is stored for reduced-precision criteria.
    """

    file: str
    sha256: str
    prompts: list[list[int]]
    steps: int
    dtype: str
    model_dtype: str
    greedy_tokens: int
    bytes: int
    source: str = "torch reference (bigcode_deploy.exporter.model), teacher-forced"


@dataclass
class Manifest:
    format: str
    format_version: int
    package_version: str
    target: str
    task: str
    dtype: str
    opset: int
    config: dict[str, Any]  # the model config (Hugging Face names), as read from the checkpoint
    graph: GraphFiles
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, dict[str, int | None]]
    kv_cache: KVCache | None
    feeding: dict[str, str]
    custom_ops: dict[str, Any]
    tokenizer: str | None
    source: dict[str, Any]
    passes: list[PassRecord] = field(default_factory=list)
    logits_positions: str = "all"  # "last": a graph whose logits are (batch, 1, vocab)
    attention_scale: str = ATTENTION_SCALE_FORMS[0]  # one of ATTENTION_SCALE_FORMS
    quantization: dict[str, Any] | None = None
    reference: ReferenceRecord | None = None
    hf_files: list[str] = field(default_factory=list)  # Hugging Face config files shipped beside the graph
    # The ids that end a generated row unless the caller gives its own: generation_config.json's eos_token_id (an
    # int or a list, any of which stops, as in transformers), else config.json's. None: not recorded (not causal-lm).
    stop_token_ids: list[int] | None = None
    # Fill-in-the-middle: the tokenizer's FIM token ids, their spelling and the prompt order (runtime/fim.py's
    # FimTokens.to_json: spelling, tokens {prefix, middle, suffix, pad}, file_sep, mode psm|spm). None: no FIM tokens.
    fim: dict[str, Any] | None = None

    # --- build ----------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        config: dict[str, Any],
        *,
        task: str,
        dtype: str,
        opset: int,
        use_cache: bool,
        package_version: str,
        graph: GraphFiles,
        source: dict[str, Any],
        tokenizer: str | None,
        custom_ops_used: list[str],
        hf_files: list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        fim: dict[str, Any] | None = None,
    ) -> Manifest:
        """The manifest of a freshly exported (portable) graph. config: the model config dict (n_layer, n_head,
        n_embd, n_positions, vocab_size, multi_query, num_labels, ...). Raises BundleError on an unknown task/dtype."""
        if task not in TASKS:
            raise BundleError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if dtype not in GRAPH_DTYPES:
            raise BundleError(f"unknown dtype {dtype!r}; choose one of {', '.join(GRAPH_DTYPES)}")
        cache = has_cache(task, use_cache)
        inputs, outputs = io_spec(config, task, dtype, use_cache)
        return cls(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            package_version=package_version,
            target="portable",
            task=task,
            dtype=dtype,
            opset=opset,
            config=dict(config),
            graph=graph,
            inputs=inputs,
            outputs=outputs,
            dims=dims(config, cache),
            kv_cache=kv_cache_section(config, dtype) if cache else None,
            feeding=feeding_rules(cache),
            custom_ops={
                "domain": DOMAIN,
                "version": DOMAIN_VERSION,
                "ops": CUSTOM_OPS,
                "reference_bodies": "model-local FunctionProtos of standard ONNX ops",
                "used": list(custom_ops_used),
            },
            tokenizer=tokenizer,
            source=dict(source),
            hf_files=list(hf_files or []),
            stop_token_ids=None if stop_token_ids is None else list(stop_token_ids),
            fim=fim,
        )

    # --- derive ---------------------------------------------------------------------------------------------
    def derive(
        self,
        *,
        target: str,
        passes: list[PassRecord],
        custom_ops_used: list[str],
        graph: GraphFiles,
        last_token_logits: bool = False,
        max_batch: int | None = None,
        quantization: dict[str, Any] | None = None,
        attention_scale: str | None = None,
    ) -> Manifest:
        """A copy for a graph lowered from this one (the input is left unchanged). attention_scale: the new
        graph's form (ATTENTION_SCALE_FORMS) when a pass changed it."""
        if target not in TARGETS:
            raise BundleError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        new = Manifest.from_json(self.to_json())
        new.target, new.passes, new.graph = target, list(passes), graph
        new.custom_ops["used"] = list(custom_ops_used)
        if last_token_logits:
            main = self.main_output
            if main != "logits" or self.task != "causal-lm":
                raise BundleError("last-token logits need a causal-lm bundle")
            new.output(main).shape[1] = 1
            new.logits_positions = "last"
        if max_batch is not None:
            new.dims[BATCH]["max"] = max_batch
        if quantization is not None:
            new.quantization = quantization
        if attention_scale is not None:
            new.attention_scale = attention_scale
        return new

    # --- read / write ---------------------------------------------------------------------------------------
    @classmethod
    def read(cls, bundle_dir: Path) -> Manifest:
        """manifest.json of a bundle directory, validated. Raises BundleError naming the file and what to do."""
        path = Path(bundle_dir) / MANIFEST_FILE
        if not os.path.lexists(path):  # anything else at that name gets read_json's precise line
            raise BundleError(
                f"{bundle_dir} is not a bundle: {MANIFEST_FILE} is missing (create one with `bigcode-deploy export`)"
            )
        raw = read_json(path, limit=MAX_MANIFEST_BYTES, error=BundleError, fix="re-export the bundle")
        return cls.from_json(raw, where=str(path))

    @classmethod
    def from_json(cls, raw: Any, where: str = MANIFEST_FILE) -> Manifest:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BundleError(f"{where} is not a {FORMAT} manifest; re-export the bundle")
        if type(raw.get("format_version")) is not int or raw.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where} has format_version {repr(raw.get('format_version'))[:40]}; this runtime reads "
                f"{FORMAT_VERSION}: "
                "re-export the bundle with this version of bigcode-deploy"
            )
        for key in ("inputs", "outputs", "passes", "hf_files"):
            if not isinstance(raw.get(key, []), list):
                raise BundleError(f"{where}: {key} is a {type(raw[key]).__name__}, not a list; re-export the bundle")
        try:
            values = dict(raw)
            values["graph"] = GraphFiles(**raw["graph"])
            values["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
            values["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
            values["kv_cache"] = KVCache(**raw["kv_cache"]) if raw.get("kv_cache") is not None else None
            values["passes"] = [PassRecord(**p) for p in raw.get("passes", [])]
            values["reference"] = ReferenceRecord(**raw["reference"]) if raw.get("reference") is not None else None
            manifest = cls(**values)
        except (KeyError, TypeError, AttributeError, RecursionError) as exc:
            what = str(exc) if len(str(exc)) <= 120 else str(exc)[:117] + "..."
            raise BundleError(
                f"{where} does not have the fields of a {FORMAT} manifest ({what}); re-export it"
            ) from None
        manifest.validate(where)
        return manifest

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # a deep, JSON-typed copy

    def write(self, bundle_dir: Path) -> None:
        (Path(bundle_dir) / MANIFEST_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    # --- validate -------------------------------------------------------------------------------------------
    def validate(self, where: str = MANIFEST_FILE) -> None:
        """Every field's type and range, sizes bounded before anything is built from them, file names plain
        (runtime/manifest_schema.py holds the schema). Raises BundleError naming the first bad field."""
        from bigcode_deploy.runtime.manifest_schema import check_manifest

        check_manifest(self, where)

    # --- queries --------------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def main_output(self) -> str:
        """logits (causal-lm, classification) or last_hidden_state (base): always the first output."""
        return self.outputs[0].name

    def output(self, name: str) -> TensorSpec:
        return next(o for o in self.outputs if o.name == name)

    def past_names(self) -> list[str]:
        kv = self.kv_cache
        return [kv.past_input.format(layer=i) for i in range(kv.num_layers)] if kv else []

    def present_names(self) -> list[str]:
        kv = self.kv_cache
        return [kv.present_output.format(layer=i) for i in range(kv.num_layers)] if kv else []


def head_dim(config: dict[str, Any]) -> int:
    return config["n_embd"] // config["n_head"]


def cache_shape(config: dict[str, Any], length: str) -> list[str | int]:
    """MQA (batch, length, 2*head_dim); MHA (batch, n_head, length, 2*head_dim)."""
    heads = [] if config["multi_query"] else [config["n_head"]]
    return [BATCH, *heads, length, 2 * head_dim(config)]


def io_spec(
    config: dict[str, Any], task: str, dtype: str, use_cache: bool
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs: name, dtype, symbolic shape, in graph order."""
    float_dtype = GRAPH_DTYPES[dtype]
    cache = has_cache(task, use_cache)
    mask_len = TOTAL if cache else SEQUENCE
    inputs = [
        TensorSpec("input_ids", "int64", [BATCH, SEQUENCE]),
        TensorSpec("attention_mask", "int64", [BATCH, mask_len]),
    ]
    if task in TASKS_WITH_CACHE:
        inputs.append(TensorSpec("position_ids", "int64", [BATCH, SEQUENCE]))
    if cache:
        inputs += [TensorSpec(past_name(i), float_dtype, cache_shape(config, PAST)) for i in range(config["n_layer"])]
    main = {
        "causal-lm": TensorSpec("logits", float_dtype, [BATCH, SEQUENCE, config["vocab_size"]]),
        "base": TensorSpec("last_hidden_state", float_dtype, [BATCH, SEQUENCE, config["n_embd"]]),
        "sequence-classification": TensorSpec("logits", float_dtype, [BATCH, config.get("num_labels", 2)]),
        "token-classification": TensorSpec("logits", float_dtype, [BATCH, SEQUENCE, config.get("num_labels", 2)]),
    }[task]
    outputs = [main]
    if cache:
        outputs += [
            TensorSpec(present_name(i), float_dtype, cache_shape(config, TOTAL)) for i in range(config["n_layer"])
        ]
    return inputs, outputs


def dims(config: dict[str, Any], cache: bool) -> dict[str, dict[str, int | None]]:
    """Range of every symbolic dim (max None: unbounded). A TensorRT profile or a service's checks read these."""
    n = config["n_positions"]
    out: dict[str, dict[str, int | None]] = {BATCH: {"min": 1, "max": None}, SEQUENCE: {"min": 1, "max": n}}
    if cache:
        out[PAST] = {"min": 0, "max": n - 1}
        out[TOTAL] = {"min": 1, "max": n}
    return out


def kv_cache_section(config: dict[str, Any], dtype: str) -> KVCache:
    D = head_dim(config)
    return KVCache(
        num_layers=config["n_layer"],
        multi_query=config["multi_query"],
        num_kv_heads=1 if config["multi_query"] else config["n_head"],
        head_dim=D,
        dtype=GRAPH_DTYPES[dtype],
        past_shape=cache_shape(config, PAST),
        present_shape=cache_shape(config, TOTAL),
        sequence_axis=1 if config["multi_query"] else 2,
        key_slice=[0, D],
        value_slice=[D, 2 * D],
    )


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
