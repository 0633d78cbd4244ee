"""Small helpers shared by the rewrite rules."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

Dims = list[int | None]  # a shape whose unknown (symbolic or computed) dims are None


def const_i64(graph: ir.Graph, values: list[int], name: str) -> ir.Value:
    """An int64 1-D initializer of the graph, reused when one of that name exists."""
    existing = graph.initializers.get(name)
    if existing is not None:
        return existing
    value = ir.val(name, const_value=ir.tensor(np.asarray(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value


def ok() -> MatchResult:
    """A successful check."""
    return MatchResult()


def fail(reason: str) -> MatchResult:
    """A failed check carrying its reason (onnxscript's MatchResult().fail(reason))."""
    return MatchResult().fail(reason)


def static_dims(value: ir.Value) -> Dims | None:
    """The value's shape with symbolic dims as None; None when its rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _shape_entries(value: ir.Value) -> Dims | None:
    """The entries of a 1-D shape tensor: constants where known, None elsewhere (a Concat of pieces included)."""
    if value.const_value is not None:
        return [int(v) for v in value.const_value.numpy().reshape(-1)]
    producer = value.producer()
    if producer is not None and producer.op_type == "Concat" and producer.domain == "":
        entries: Dims = []
        for piece in producer.inputs:
            piece_entries = _shape_entries(piece) if piece is not None else None
            if piece_entries is None:
                dims = static_dims(piece) if piece is not None else None
                if dims is None or len(dims) != 1 or dims[0] is None:
                    return None
                piece_entries = [None] * dims[0]
            entries.extend(piece_entries)
        return entries
    dims = static_dims(value)
    if dims is not None and len(dims) == 1 and dims[0] is not None:
        return [None] * dims[0]
    return None


def reshape_dims(node: ir.Node) -> Dims | None:
    """What a Reshape produces: its shape input's constant entries, completed by its output's recorded shape.

    A 0 entry (without allowzero) copies the input's dim; -1 and computed entries are None unless the output's
    recorded shape knows them. None when the rank cannot be told.
    """
    entries = _shape_entries(node.inputs[1])
    recorded = static_dims(node.outputs[0])
    if entries is None:
        return recorded
    allowzero = node.attributes.get_int("allowzero", 0)
    data = static_dims(node.inputs[0]) or []
    dims: Dims = []
    for i, entry in enumerate(entries):
        if entry == 0 and not allowzero:
            dims.append(data[i] if i < len(data) else None)
        else:
            dims.append(entry if entry is not None and entry >= 0 else None)
    if recorded is not None and len(recorded) == len(dims):
        dims = [d if d is not None else r for d, r in zip(dims, recorded)]
    return dims


def format_dims(dims: Dims | None) -> str:
    """(2, ?, 8): a shape for a reason message."""
    if dims is None:
        return "an unknown shape"
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
