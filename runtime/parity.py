"""Comparing a bundle's outputs with the torch reference.

Comparison is separate from running (Polygraphy's practice): a value mismatches only when it exceeds both the
absolute tolerance and the relative one, taken against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exporter.errors import BigCodeError

# Tolerances per graph dtype, (abs, rel), for a backend against the torch reference in the same dtype.
# fp32: the bound, 1e-4, on logits of magnitude ~1-10; ORT CPU was measured at ~2e-6 (kernels differ,
#   reductions reorder).
# fp16: ORT and torch round the same fp16 matmuls and LayerNorms at different points. Measured 4e-3 to 7e-3 on
#   logits of magnitude ~4 (4 layers, 3 seeds, MQA and MHA): 1-2 ulps there (fp16's ulp is 2^-8 at 4).
#   Allowed: 4 ulps, i.e. 4 * 2^-10 = 4e-3 relative, or 2e-2 absolute for values near the logits' scale.
# bf16: the same reasoning with 8 significant bits: 4 * 2^-7 = 3e-2 relative, 0.125 absolute.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 4e-3), "bf16": (1.25e-1, 3e-2)}

# Weight-only quantized bundles are judged against the fp32 reference on what a user sees, not elementwise:
# teacher-forced top-1 agreement over every real position, and the mean absolute logit error (over all
# positions and the whole vocabulary). int8 must be tighter than int4. Measured on the trained default model
# (verify, 8 decode steps, random-id prompts, onnxruntime 1.32 on this CPU): int8 top-1 1.000 and mean abs
# 0.019; int4 top-1 0.884 and mean abs 0.153 (its logits span about +-10). The bounds leave room for
# MatMulNBits' int8-activation kernels, which differ between CPU instruction sets.
QUANTIZED_CRITERIA = {
    "int8": {"min_top1": 0.97, "max_mean_abs": 0.05},
    "int4": {"min_top1": 0.80, "max_mean_abs": 0.25},
}


class ParityError(BigCodeError):
    """A graph whose outputs disagree with the reference beyond tolerance."""


@dataclass
class Comparison:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mismatches: int
    size: int

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def compare(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> Comparison:
    if actual.shape != expected.shape:
        raise ParityError(f"{name}: shape {actual.shape} where the reference has {expected.shape}")
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    diff = np.abs(a - e)
    rel = diff / np.maximum(np.abs(e), 1e-12)
    bad = (diff > atol) & (diff > rtol * np.abs(e))
    bad |= ~np.isfinite(a) & np.isfinite(e)
    return Comparison(
        name=name,
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mismatches=int(bad.sum()),
        size=int(diff.size),
    )


@dataclass
class ParityReport:
    dtype: str
    atol: float
    rtol: float
    steps: list[list[Comparison]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for step in self.steps for c in step)

    def first_failure(self) -> tuple[int, Comparison] | None:
        for i, step in enumerate(self.steps):
            for c in step:
                if not c.ok:
                    return i, c
        return None

    def summary(self) -> str:
        worst = max((c.max_abs for step in self.steps for c in step), default=0.0)
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity {verdict}: {len(self.steps)} step(s), worst max abs diff {worst:.3g} "
            f"(tolerance: abs {self.atol:g} and rel {self.rtol:g}, {self.dtype})"
        )
