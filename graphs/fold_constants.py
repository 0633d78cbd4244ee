"""Rule: constant folding and dead-node removal, by onnxscript's optimizer (a well-kept library does this).

Fires once per node removed from the graph.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import optimizer


def apply(model: ir.Model) -> int:
    before = sum(1 for _ in model.graph.all_nodes())
    optimizer.optimize(model, num_iterations=2)
    return max(0, before - sum(1 for _ in model.graph.all_nodes()))
