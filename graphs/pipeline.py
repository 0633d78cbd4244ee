"""The flat orchestrator: each target's passes in order, recording how many times each fired and, when a pass
fired 0 times, why."""

from __future__ import annotations

import onnx_ir as ir

from bigcode_deploy.graphs import (
    fold_constants,
    inline_functions,
    last_token_logits,
    mqa_broadcast_attention,
    ort_fusions,
    scale_on_query,
)
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.manifest import TARGETS, PassRecord


def run_passes(model: ir.Model, target: str, last_token_only: bool = False) -> list[PassRecord]:
    """Rewrite the model in place for the target; returns one PassRecord per pass, in the order applied.

    ort_fusions records one PassRecord per fusion tried (`ort_fusions.<name>`, with the reason when it found no
    match), or one `ort_fusions` record with count 0 and the reason when none fired. Raises ValueError for an
    unknown target, BigCodeError for a tensorrt graph that would keep a per-layer softmax unscale (TensorRT
    would not fuse its attention).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    applied: list[PassRecord] = []

    def record(name: str, result: tuple[int, str | None]) -> None:
        count, reason = result
        applied.append(PassRecord(name, int(count), None if count else reason))

    if target == "tensorrt":
        # Matches the bigcode softmax node to find each attention, so it runs before the functions are inlined.
        record(mqa_broadcast_attention.NAME, mqa_broadcast_attention.apply(model))
        # Also on the bigcode softmax's scale attribute, so before inlining; after the MQA rule, whose Reshape and
        # Transpose of Q it walks through.
        record(scale_on_query.NAME, scale_on_query.apply(model))
        left = scale_on_query.unfolded(model)
        if left:
            raise BigCodeError(
                f"the tensorrt graph would keep a per-layer softmax unscale after {len(left)} attention(s), which "
                f"blocks TensorRT's attention fusion: {left[0]}"
            )
    # Every target inlines: the portable graph needs only standard ops, ORT's fusions and TensorRT's importer see
    # plain ops (a bigcode node left in a TensorRT graph would need a plugin).
    record(inline_functions.NAME, inline_functions.apply(model))
    if last_token_only:
        # Before folding, so the slice's constants fold with the rest.
        record(last_token_logits.NAME, last_token_logits.apply(model))
    record(fold_constants.NAME, fold_constants.apply(model))
    if target == "ort":
        # After folding: the fusion patterns match constants, not the subgraphs that computed them.
        counts, reason = ort_fusions.apply(model)
        for name, count in counts.items():  # every fusion tried: one that found no match says so
            record(f"{ort_fusions.NAME}.{name}", (count, None if count else f"onnxscript's {name} found no match here"))
        if not counts:
            record(ort_fusions.NAME, (0, reason))
    return applied
