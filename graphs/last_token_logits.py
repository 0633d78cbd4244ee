"""Rule: compute logits for each row's last position only.

A prefill otherwise pays the full-vocabulary matmul (B, T, E) x (E, vocab) for every prompt token, though
generation reads only the last position. Target: the MatMul that produces the graph output `logits` from
hidden states (B, T, E); replacement: Slice(hidden, [-1:], axis 1) in front of it, so logits become
(B, 1, vocab). With left padding every row's last position is a real token. Fires once.
"""

from __future__ import annotations

import onnx_ir as ir

from graphs._ir import const_i64

INT64_MAX = 2**63 - 1


def why_not(model: ir.Model) -> str | None:
    outputs = {v.name: v for v in model.graph.outputs}
    logits = outputs.get("logits")
    if logits is None:
        return "the graph has no `logits` output"
    producer = logits.producer()
    if producer is None or producer.op_type != "MatMul":
        return "`logits` is not produced by a MatMul (the lm_head)"
    shape = logits.shape
    if shape is None or len(shape) != 3:
        return "`logits` is not (batch, sequence, vocab)"
    if shape[1] == 1:
        return "logits already cover the last position only"
    return None


def apply(model: ir.Model) -> int:
    if why_not(model):
        return 0
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    lm_head = logits.producer()
    hidden = lm_head.inputs[0]  # (B, T, E)
    tape = ir.tape.Tape()
    graph = model.graph
    last = tape.op("Slice", [hidden, const_i64(graph, [-1], "last_position_start"),
                             const_i64(graph, [INT64_MAX], "last_position_end"), const_i64(graph, [1], "sequence_axis")])
    graph.insert_before(lm_head, tape.nodes)
    lm_head.replace_input_with(0, last)  # (B, 1, E) -> logits (B, 1, vocab)
    logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
    return 1
