"""Rule: compute logits for each row's last position only.

A prefill otherwise pays the full-vocabulary matmul (B, T, E) x (E, vocab) for every prompt token, though
generation reads only the last position.
Pattern: the MatMul that produces the graph output `logits` from hidden states (B, T, E). Check: it is a MatMul
and logits are (B, T, vocab) with T not already 1. Rewrite: Slice(hidden, [-1:], axis 1) in front of it, so
logits become (B, 1, vocab). With left padding every row's last position is a real token. Fires once.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from bigcode_deploy.graphs._ir import const_i64, fail, ok

NAME = "last_token_logits"
OUTPUT = "logits"
INT64_MAX = 2**63 - 1


def pattern(model: ir.Model) -> tuple[ir.Value, ir.Node | None] | None:
    """The `logits` graph output and its producer; None when the graph has no such output."""
    logits = next((v for v in model.graph.outputs if v.name == OUTPUT), None)
    return None if logits is None else (logits, logits.producer())


def check(model: ir.Model) -> MatchResult:
    """Success when the lm_head MatMul can be fed the last position only; else the reason."""
    found = pattern(model)
    if found is None:
        return fail(f"the graph has no `{OUTPUT}` output")
    logits, producer = found
    if producer is None or producer.op_type != "MatMul" or producer.domain != "":
        op_type = producer.op_type if producer is not None else "no node"
        return fail(f"`{OUTPUT}` is produced by {op_type}, not by a MatMul (the lm_head)")
    shape = logits.shape
    if shape is None or len(shape) != 3:
        return fail(f"`{OUTPUT}` is not (batch, sequence, vocab)")
    if shape[1] == 1:
        return fail("logits already cover the last position only")
    return ok()


def rewrite(model: ir.Model) -> None:
    """Insert Slice(hidden, [-1:], axis 1) before the lm_head MatMul; logits become (B, 1, vocab)."""
    logits, lm_head = pattern(model)
    graph = model.graph
    starts = const_i64(graph, [-1], "last_position_start")
    ends = const_i64(graph, [INT64_MAX], "last_position_end")
    axes = const_i64(graph, [1], "sequence_axis")
    tape = ir.tape.Tape()
    last = tape.op("Slice", [lm_head.inputs[0], starts, ends, axes])  # (B, T, E) -> (B, 1, E)
    graph.insert_before(lm_head, tape.nodes)
    lm_head.replace_input_with(0, last)
    logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])


def apply(model: ir.Model) -> tuple[int, str | None]:
    """(1, None) when the lm_head now sees the last position only, else (0, the reason)."""
    result = check(model)
    if not result:
        return 0, result.reason
    rewrite(model)
    return 1, None
