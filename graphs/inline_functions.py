"""Rule: inline the `bigcode` custom ops into their reference bodies (standard ONNX ops).

For consumers without a kernel or plugin for the custom ops: any ONNX runtime can then run the graph, and
later passes (ORT's fusions, the TensorRT attention form) see plain ops.
Pattern: every node of the custom domain. Check: each has a model-local function body. Rewrite: onnx_ir's
InlinePass, then the bigcode functions and the unused opset imports are dropped. Fires once per bigcode node.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass
from onnxscript.rewriter import MatchResult

from bigcode_deploy.graphs._ir import fail, ok
from bigcode_deploy.runtime.manifest import DOMAIN

NAME = "inline_functions"


def pattern(model: ir.Model) -> list[ir.Node]:
    """The nodes of the custom domain, subgraphs included."""
    return [node for node in model.graph.all_nodes() if node.domain == DOMAIN]


def check(model: ir.Model) -> MatchResult:
    """Success when every bigcode node has a function body to inline; else the reason."""
    nodes = pattern(model)
    if not nodes:
        return fail(f"the graph has no {DOMAIN} nodes")
    bodies = {name for (domain, name, _) in model.functions if domain == DOMAIN}
    missing = sorted({node.op_type for node in nodes} - bodies)
    if missing:
        return fail(f"no function body for {DOMAIN}::{missing[0]}")
    return ok()


def rewrite(model: ir.Model) -> None:
    """Inline every function call, then drop the bigcode functions and opset imports no node uses."""
    InlinePass()(model)
    for key in [k for k in model.functions if k[0] == DOMAIN]:
        del model.functions[key]
    RemoveUnusedOpsetsPass()(model)


def apply(model: ir.Model) -> tuple[int, str | None]:
    """(number of bigcode nodes inlined, None), or (0, the reason it did not fire)."""
    result = check(model)
    if not result:
        return 0, result.reason
    count = len(pattern(model))
    rewrite(model)
    return count, None
