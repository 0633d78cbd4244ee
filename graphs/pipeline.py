"""The flat orchestrator: each target's passes in order, returning how many times each fired."""

from __future__ import annotations

import onnx_ir as ir

from graphs import fold_constants, inline_functions, last_token_logits, mqa_broadcast_attention, ort_fusions

TARGETS = ("portable", "ort", "tensorrt")


def run_passes(model: ir.Model, target: str, last_token_only: bool = False) -> list[dict]:
    """Rewrite the model in place for the target; returns [{"name", "count"}] in the order applied."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    applied: list[dict] = []

    def record(name: str, count: int) -> None:
        applied.append({"name": name, "count": int(count)})

    if target == "tensorrt":
        # Matches the bigcode softmax node to find each attention, so it runs before the functions are inlined.
        record("mqa_broadcast_attention", mqa_broadcast_attention.apply(model))
    # Every target inlines: the portable graph needs only standard ops, ORT's fusions and TensorRT's importer see
    # plain ops (a bigcode node left in a TensorRT graph would need a plugin).
    record("inline_functions", inline_functions.apply(model))
    if last_token_only:
        # Before folding, so the slice's constants fold with the rest.
        record("last_token_logits", last_token_logits.apply(model))
    record("fold_constants", fold_constants.apply(model))
    if target == "ort":
        # After folding: the fusion patterns match constants, not the subgraphs that computed them.
        for name, count in ort_fusions.apply(model).items():
            record(f"ort_fusions.{name}", count)
    return applied
