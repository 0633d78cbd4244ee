"""`bigcode-deploy inspect`: a bundle's manifest summary and node counts by (domain, op)."""

from __future__ import annotations

from collections import Counter

import onnx

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.parity_record import parity_summary


def node_counts(model: onnx.ModelProto) -> Counter:
    """(domain, op_type) -> count over the main graph (function bodies are counted apart, by function)."""
    return Counter((node.domain or "ai.onnx", node.op_type) for node in model.graph.node)


def describe(path: str) -> str:
    bundle = Bundle.open(path)
    m = bundle.manifest
    c = m.config
    model = bundle.graph_model()  # parsed from the verified bytes; BundleError for a file that is not a model
    lines = [
        f"bundle      {bundle.path}",
        f"format      {m.format} v{m.format_version} (bigcode-deploy {m.package_version})",
        f"task        {m.task}    dtype {m.dtype}    opset {m.opset}    target {m.target}",
        f"model       {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads "
        f"({'multi-query' if c['multi_query'] else 'multi-head'}), vocab {c['vocab_size']}, context {c['n_positions']}",
        f"tokenizer   {m.tokenizer or 'none (token ids in and out)'}",
        "inputs",
        *[f"  {i.name:<32} {i.dtype:<8} {i.shape}" for i in m.inputs],
        "outputs",
        *[f"  {o.name:<32} {o.dtype:<8} {o.shape}" for o in m.outputs],
        "passes      "
        + (", ".join(f"{p.name} x{p.count}" + (f" ({p.reason})" if p.reason else "") for p in m.passes) or "none"),
        "quantized   "
        + (
            f"{m.quantization['scheme']} weight-only "
            f"({m.quantization.get('op')}, block {m.quantization.get('block_size')})"
            if m.quantization
            else "none"
        ),
        "reference   "
        + (
            f"{m.reference.file}: fp32 torch, {len(m.reference.prompts)} prompts, {m.reference.steps} steps"
            + (f", torch {m.reference.model_dtype} error terms" if m.reference.model_dtype != "fp32" else "")
            if m.reference
            else "none (verify needs --model MODEL_DIR)"
        ),
        "parity      " + _parity_line(parity_summary(bundle)),
        "functions   " + (", ".join(f"{f.domain}::{f.name}" for f in model.functions) or "none"),
        "nodes",
        *[f"  {domain:<10} {op:<28} {n}" for (domain, op), n in sorted(node_counts(model).items())],
    ]
    return "\n".join(lines)


def _parity_line(summary: dict) -> str:
    if summary["status"] == "none":
        return f"none ({summary['reason']})"
    s = summary
    return f"{s['status']} on {s['backend']} against the {s['reference']} reference ({s['criterion']})"
