"""`bigcode-deploy inspect`: a bundle's manifest summary and node counts by (domain, op)."""

from __future__ import annotations

from collections import Counter

import onnx

from bigcode_deploy.runtime.bundle import Bundle


def node_counts(model: onnx.ModelProto) -> Counter:
    """(domain, op_type) -> count over the main graph (function bodies are counted apart, by function)."""
    return Counter((node.domain or "ai.onnx", node.op_type) for node in model.graph.node)


def describe(path: str) -> str:
    bundle = Bundle.open(path)
    m = bundle.manifest
    c = m.config
    model = onnx.load(str(bundle.graph_path), load_external_data=False)
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
        "functions   " + (", ".join(f"{f.domain}::{f.name}" for f in model.functions) or "none"),
        "nodes",
        *[f"  {domain:<10} {op:<28} {n}" for (domain, op), n in sorted(node_counts(model).items())],
    ]
    return "\n".join(lines)
