"""Small helpers shared by the rewrite rules."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def const_i64(graph: ir.Graph, values: list[int], name: str) -> ir.Value:
    """An int64 1-D initializer of the graph, reused when one of that name exists."""
    existing = graph.initializers.get(name)
    if existing is not None:
        return existing
    value = ir.val(name, const_value=ir.tensor(np.asarray(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value
