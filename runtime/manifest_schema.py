"""The manifest's schema, checked in one place before anything reads a field: `check_manifest(manifest, where)`.

A bundle is a shipped artifact, as untrusted as a downloaded file. Every field is checked for its type and range,
the required ones and the informative ones alike, and every size is bounded before anything is built from it (a
manifest stating n_layer = 10**12 is refused before one per-layer name is made). No float anywhere may be NaN or
infinite. Every file the manifest names must be a plain file name (no directory part, no `..`, not absolute); that
it resolves inside the bundle directory is runtime/bundle.py's check, which sees the directory.

Each refusal is a BundleError of one line: `<manifest path>: <field> <what is wrong>; re-export the bundle`, with
the value shortened to at most VALUE_CHARS characters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from bigcode_deploy.runtime.bounded_file import first_non_finite
from bigcode_deploy.runtime.errors import BundleError
from bigcode_deploy.runtime.fim import check_fim_record
from bigcode_deploy.runtime.manifest import (
    ATTENTION_SCALE_FORMS,
    BATCH,
    CUSTOM_OPS,
    DOMAIN,
    DOMAIN_VERSION,
    FORMAT_VERSION,
    GRAPH_DTYPES,
    MAX_DIM,
    MAX_LAYERS,
    MAX_STOP_IDS,
    OPSETS,
    QUANTIZATION_BITS,
    QUANTIZATION_SCHEMES,
    TARGETS,
    TASKS,
    dims,
    io_spec,
    kv_cache_section,
)

if TYPE_CHECKING:
    from bigcode_deploy.runtime.manifest import Manifest

VALUE_CHARS = 60  # a value quoted in an error is cut to this many characters: the line stays short
MAX_TEXT = 4096  # an informative string field (package_version, a pass's reason, ...)
MAX_PROMPTS = 16  # reference.prompts: the recipe uses 3
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# config fields other than the five sizes and multi_query: (kind, required). Unknown fields are kept as they are
# (informative), but no float anywhere may be non-finite.
CONFIG_FIELDS = {
    "n_inner": ("size or null", False),
    "num_labels": ("size", False),
    "bos_token_id": ("id or null", False),
    "pad_token_id": ("id or null", False),
    "eos_token_id": ("ids or null", False),
    "layer_norm_epsilon": ("positive or null", False),
    "initializer_range": ("non-negative or null", False),
    "resid_pdrop": ("probability or null", False),
    "embd_pdrop": ("probability or null", False),
    "attn_pdrop": ("probability or null", False),
    "classifier_dropout": ("probability or null", False),
    "scale_attn_weights": ("bool", False),
    "use_cache": ("bool", False),
    "attention_softmax_in_fp32": ("bool", False),
    "scale_attention_softmax_in_fp32": ("bool", False),
    "tie_word_embeddings": ("bool", False),
    "add_cross_attention": ("bool", False),
    "model_type": ("text", False),
    "activation_function": ("text", False),
    "torch_dtype": ("text or null", False),
}


def short(value: Any) -> str:
    """repr(value), cut to VALUE_CHARS characters (a hostile value may be megabytes long)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def is_int(value: Any, lo: int = 0, hi: int = MAX_DIM) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range (JSON allows 10**400)
        return False


def is_text(value: Any, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


def is_plain_name(name: Any) -> bool:
    """A file name inside the bundle directory itself: no directory part, not `.` or `..`, not absolute, no NUL."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and "\0" not in name
        and "/" not in name
        and "\\" not in name
        and PurePosixPath(name).name == name
    )


def same(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (1.0 is not 1 and true is not 1, as they are in Python)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_manifest(m: Manifest, where: str) -> None:
    """Raise BundleError (one line naming `where`, the field, its value and what to do) for the first field of `m`
    that is not what the format allows. Runs in time linear in the manifest's size and builds nothing from a size
    before bounding it."""

    def bad(name: str, what: str) -> BundleError:
        name = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name[:VALUE_CHARS])  # keys are data too
        return BundleError(f"{where}: {name} {what}; re-export the bundle")

    def need_int(name: str, value: Any, lo: int, hi: int) -> None:
        if not is_int(value, lo, hi):
            raise bad(name, f"is {short(value)}, not an integer in [{lo}, {hi}]")

    # Scalars first: every later check may rely on their types.
    if not is_int(m.format_version, FORMAT_VERSION, FORMAT_VERSION):
        raise bad("format_version", f"is {short(m.format_version)}, not {FORMAT_VERSION}")
    if not is_text(m.package_version, 100):
        raise bad("package_version", f"is {short(m.package_version)}, not a version string")
    for name, allowed in (
        ("task", TASKS),
        ("dtype", tuple(GRAPH_DTYPES)),
        ("target", TARGETS),
        ("logits_positions", ("all", "last")),
        ("attention_scale", ATTENTION_SCALE_FORMS),
    ):
        value = getattr(m, name)
        if not isinstance(value, str) or value not in allowed:
            raise bad(name, f"is {short(value)}, not one of {', '.join(allowed)}")
    need_int("opset", m.opset, OPSETS.start, OPSETS.stop - 1)
    for name in ("config", "source", "custom_ops", "feeding"):
        if not isinstance(getattr(m, name), dict):
            raise bad(name, f"is {short(getattr(m, name))}, not an object")
    where_nan = first_non_finite(m)
    if where_nan is not None:
        raise bad(where_nan or "(the manifest)", "is not a finite number")

    check_config(m.config, bad)
    c = m.config
    cache = m.kv_cache is not None
    if cache and m.task not in ("causal-lm", "base"):
        raise bad("kv_cache", f"is given for a {m.task} graph, which has no cache")

    # The graph's I/O must be the contract's: names, dtypes and shapes (last-token logits: sequence 1). n_layer is
    # bounded above, so building the expected lists is bounded too.
    expected_in, expected_out = io_spec(c, m.task, m.dtype, cache)
    if m.logits_positions == "last":
        if m.task != "causal-lm":
            raise bad("logits_positions", "is 'last' on a graph that is not causal-lm")
        expected_out[0].shape[1] = 1
    for label, found, expected in (("inputs", m.inputs, expected_in), ("outputs", m.outputs, expected_out)):
        if not isinstance(found, list) or len(found) != len(expected):
            raise bad(label, f"do not match a {m.task} {m.dtype} graph's ({len(expected)} tensors, in order)")
        if not same([[t.name, t.dtype, t.shape] for t in found], [[t.name, t.dtype, t.shape] for t in expected]):
            raise bad(label, f"do not match a {m.task} {m.dtype} graph's (names, dtypes, shapes, in order)")
    if cache and not same(dataclasses.asdict(m.kv_cache), dataclasses.asdict(kv_cache_section(c, m.dtype))):
        raise bad("kv_cache", "does not match the config (layers, heads, head_dim, dtype, shapes, name templates)")
    check_dims(m.dims, dims(c, cache), bad)

    # Files: plain names inside the bundle, each graph file with its sha256.
    g = m.graph
    if not is_plain_name(g.file):
        raise bad("graph.file", f"names {short(g.file)}, which is not a plain file name inside the bundle")
    if g.external_data is not None and (not is_plain_name(g.external_data) or g.external_data == g.file):
        raise bad("graph.external_data", f"names {short(g.external_data)}, not a plain file name beside the graph")
    if not isinstance(g.sha256, dict) or set(g.sha256) != set(g.names):
        raise bad("graph.sha256", f"must map exactly {', '.join(g.names)} to their sha256")
    for name, digest in g.sha256.items():
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise bad(f"graph.sha256.{name}", f"is {short(digest)}, not a sha256 (64 lowercase hex digits)")
    if m.tokenizer is not None and not is_plain_name(m.tokenizer):
        raise bad("tokenizer", f"names {short(m.tokenizer)}, which is not a plain file name inside the bundle")
    if not isinstance(m.hf_files, list) or not all(is_plain_name(n) for n in m.hf_files):
        raise bad("hf_files", "is not a list of plain file names inside the bundle")

    for key, value in m.feeding.items():
        if not is_text(value):
            raise bad(f"feeding.{key}", f"is {short(value)}, not a sentence")
    check_custom_ops(m.custom_ops, bad)
    check_source(m.source, bad)
    if not isinstance(m.passes, list):
        raise bad("passes", "is not a list")
    for i, p in enumerate(m.passes):
        if not is_text(p.name, 200) or not is_int(p.count) or not (p.reason is None or is_text(p.reason)):
            raise bad(f"passes.{i}", "is not a pass record (name: text, count: integer >= 0, reason: text or null)")
    check_quantization(m.quantization, bad)
    check_fim_record(m.fim, c["vocab_size"], bad)
    stops = m.stop_token_ids  # the default stop ids (generation_config.json's eos list); None: not recorded
    if stops is not None and not (
        isinstance(stops, list) and len(stops) <= MAX_STOP_IDS and all(is_int(t, 0, c["vocab_size"] - 1) for t in stops)
    ):
        raise bad("stop_token_ids", f"is {short(stops)}, not a list of token ids in [0, config.vocab_size)")
    if m.reference is not None:
        check_reference(m.reference, c, bad)


def check_config(c: dict[str, Any], bad) -> None:
    for name, hi in (("vocab_size", MAX_DIM), ("n_positions", MAX_DIM), ("n_layer", MAX_LAYERS)):
        if not is_int(c.get(name), 1, hi):
            raise bad(f"config.{name}", f"is {short(c.get(name))}, not an integer in [1, {hi}]")
    for name in ("n_embd", "n_head"):
        if not is_int(c.get(name), 1, MAX_DIM):
            raise bad(f"config.{name}", f"is {short(c.get(name))}, not an integer in [1, {MAX_DIM}]")
    if not isinstance(c.get("multi_query"), bool):
        raise bad("config.multi_query", f"is {short(c.get('multi_query'))}, not true or false")
    if c["n_embd"] % c["n_head"]:
        raise bad("config.n_embd", f"({c['n_embd']}) is not divisible by config.n_head ({c['n_head']})")
    vocab = c["vocab_size"]
    for name, (kind, required) in CONFIG_FIELDS.items():
        if name not in c:
            if required:
                raise bad(f"config.{name}", "is missing")
            continue
        value = c[name]
        nullable = kind.endswith(" or null")
        if nullable and value is None:
            continue
        base = kind.removesuffix(" or null")
        ok = {
            "size": lambda v: is_int(v, 1, MAX_DIM),
            "id": lambda v: is_int(v, 0, vocab - 1),
            "ids": lambda v: (
                is_int(v, 0, vocab - 1)
                or (isinstance(v, list) and 0 < len(v) <= 64 and all(is_int(i, 0, vocab - 1) for i in v))
            ),
            "positive": lambda v: is_number(v) and v > 0,
            "non-negative": lambda v: is_number(v) and v >= 0,
            "probability": lambda v: is_number(v) and 0 <= v <= 1,
            "bool": lambda v: isinstance(v, bool),
            "text": lambda v: is_text(v, 200),
        }[base](value)
        if not ok:
            what = {
                "size": f"an integer in [1, {MAX_DIM}]",
                "id": f"a token id in [0, {vocab})",
                "ids": f"a token id in [0, {vocab}) or a list of them",
                "positive": "a positive number",
                "non-negative": "a number >= 0",
                "probability": "a number in [0, 1]",
                "bool": "true or false",
                "text": "a short string",
            }[base]
            raise bad(f"config.{name}", f"is {short(value)}, not {what}{' or null' if nullable else ''}")


def check_dims(found: Any, expected: dict[str, dict[str, int | None]], bad) -> None:
    if not isinstance(found, dict) or set(found) != set(expected):
        raise bad("dims", f"must name exactly {', '.join(expected)}")
    for name, rng in found.items():
        if name == BATCH and isinstance(rng, dict) and set(rng) == {"min", "max"} and same(rng["min"], 1):
            if rng["max"] is None or is_int(rng["max"], 1, MAX_DIM):
                continue  # the batch range may be bounded by a target (tensorrt --max-batch)
        if not same(rng, expected[name]):
            raise bad(f"dims.{name}", f"is {short(rng)}, not the config's {expected[name]!r}")


def check_custom_ops(ops: dict[str, Any], bad) -> None:
    if not same(ops.get("domain"), DOMAIN) or not same(ops.get("version"), DOMAIN_VERSION):
        raise bad("custom_ops", f"is not the {DOMAIN} domain, version {DOMAIN_VERSION}")
    if not same(ops.get("ops"), CUSTOM_OPS):
        raise bad("custom_ops.ops", f"is not the {DOMAIN} domain's op table (runtime/manifest.py CUSTOM_OPS)")
    if not is_text(ops.get("reference_bodies")):
        raise bad("custom_ops.reference_bodies", f"is {short(ops.get('reference_bodies'))}, not a sentence")
    used = ops.get("used")
    if not isinstance(used, list) or not all(isinstance(u, str) and u in CUSTOM_OPS for u in used):
        raise bad("custom_ops.used", f"is {short(used)}, not a list of {', '.join(CUSTOM_OPS)}")


def check_source(source: dict[str, Any], bad) -> None:
    model_dir = source.get("model_dir")
    if model_dir is not None and not is_text(model_dir):
        raise bad("source.model_dir", f"is {short(model_dir)}, not a directory path")
    digests = source.get("sha256", {})
    if not isinstance(digests, dict) or not all(
        is_plain_name(k) and isinstance(v, str) and SHA256.match(v) for k, v in digests.items()
    ):
        raise bad("source.sha256", "is not an object of checkpoint file name -> sha256")


def check_quantization(q: Any, bad) -> None:
    if q is None:
        return
    if not isinstance(q, dict) or not isinstance(q.get("scheme"), str) or q["scheme"] not in QUANTIZATION_SCHEMES:
        raise bad("quantization.scheme", f"is not one of {', '.join(QUANTIZATION_SCHEMES)}")
    if not same(q.get("bits"), QUANTIZATION_BITS[q["scheme"]]):
        raise bad("quantization.bits", f"is {short(q.get('bits'))}, not {QUANTIZATION_BITS[q['scheme']]}")
    if not is_int(q.get("block_size"), 1, 1 << 16):
        raise bad("quantization.block_size", f"is {short(q.get('block_size'))}, not a block size")
    if "op" in q and not is_text(q["op"], 200):
        raise bad("quantization.op", f"is {short(q['op'])}, not an op name")


def check_reference(r, c: dict[str, Any], bad) -> None:
    vocab, n_positions = c["vocab_size"], c["n_positions"]
    if not is_plain_name(r.file):
        raise bad("reference.file", f"names {short(r.file)}, which is not a plain file name inside the bundle")
    if not isinstance(r.sha256, str) or not SHA256.match(r.sha256):
        raise bad("reference.sha256", f"is {short(r.sha256)}, not a sha256 (64 lowercase hex digits)")
    if not is_int(r.steps, 0, n_positions):
        raise bad("reference.steps", f"is {short(r.steps)}, not a count of decode steps")
    prompts = r.prompts
    if not (
        isinstance(prompts, list)
        and 0 < len(prompts) <= MAX_PROMPTS
        and all(isinstance(p, list) and 0 < len(p) <= n_positions for p in prompts)
        and all(is_int(t, 0, vocab - 1) for p in prompts for t in p)
    ):
        raise bad("reference.prompts", f"is not a list of at most {MAX_PROMPTS} lists of token ids in the vocabulary")
    if r.dtype != "fp32" or not isinstance(r.model_dtype, str) or r.model_dtype not in GRAPH_DTYPES:
        raise bad("reference.dtype", f"is {short(r.dtype)} / {short(r.model_dtype)}: the reference is fp32 torch")
    if not is_int(r.greedy_tokens, 0, n_positions):
        raise bad("reference.greedy_tokens", f"is {short(r.greedy_tokens)}, not a count of tokens")
    if not is_int(r.bytes, 0, 1 << 62):
        raise bad("reference.bytes", f"is {short(r.bytes)}, not a size in bytes")
    if not is_text(r.source):
        raise bad("reference.source", f"is {short(r.source)}, not a sentence")
