"""Rule: constant folding and dead-node removal, by onnxscript's optimizer (a well-kept library does this).

Pattern and check are the optimizer's own (nodes whose inputs are all constant, nodes nothing uses). Fires once
per node removed from the graph.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import optimizer

NAME = "fold_constants"
NOTHING = "no node with only constant inputs and no unused node: nothing to fold"


def apply(model: ir.Model) -> tuple[int, str | None]:
    """(number of nodes removed, None), or (0, the reason nothing was folded)."""
    before = sum(1 for _ in model.graph.all_nodes())
    optimizer.optimize(model, num_iterations=2)
    removed = max(0, before - sum(1 for _ in model.graph.all_nodes()))
    return removed, None if removed else NOTHING
