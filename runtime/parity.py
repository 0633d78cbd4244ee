"""Parity, judged once: a candidate's teacher-forced outputs against the fp32 torch reference, one report type.

Running is runtime/reference.py's (`teacher_forced`); here a comparison is built from the criteria of the bundle
(Polygraphy's practice) and applied to outputs it did not produce. export's check, optimize's check and verify all
call `judge`, with the same criteria, so a bundle cannot pass one and fail another on the same outputs.

Criteria, by what the bundle is:
- fp32 graph: elementwise. A value mismatches when it is beyond both the absolute and the relative tolerance
  (TOLERANCES), taken against the reference: the main output at every real position, and each layer's present
  statistics (runtime/reference.py). 1e-4 on logits of magnitude ~1-10; ONNX Runtime on this CPU measures ~2e-6
  (kernels differ, reductions reorder).
- fp16 / bf16 graph: against the fp32 reference too, never against a reduced-precision reference at a fixed
  tolerance. Per step and output, the candidate's error to the fp32 reference (max abs and mean abs of the main
  output; the absolute difference of each present statistic) must stay within REDUCED_PRECISION_FACTOR times the
  error of the torch model in the same dtype, plus half a unit in the last place of the dtype at the reference's
  magnitude (so an error of exactly 0 on the torch side does not demand exactly 0).
- weight-only quantized graph: by what a user sees, not elementwise (QUANTIZED_CRITERIA): teacher-forced top-1
  agreement over every real position and the mean absolute logit error over all of them.
Any non-finite value in a candidate's output fails it (counted, with the first position). A comparison of nothing
(no real positions) is refused, not passed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from bigcode_deploy.runtime.errors import ParityError
from bigcode_deploy.runtime.manifest import Manifest
from bigcode_deploy.runtime.reference import ReferenceOutputs, TeacherForced

# fp32 against the fp32 reference: (abs, rel).
TOLERANCES = {"fp32": (1e-4, 1e-4)}

# Reduced precision: the candidate's error to fp32 within this factor of the same-dtype torch model's own error.
# ONNX Runtime and torch round the same fp16 matmuls and LayerNorms at different points, so their errors to fp32
# are of the same size but not equal. Measured (fp16, 5 steps, the reference prompts) on the default model and on
# eight random 4-layer models (std 0.2 weights, seeds 0-3, MQA and MHA): ORT's max abs logit error was 0.44x-1.22x
# torch fp16's, its mean abs 0.46x-0.91x, and its present-statistics differences at most 1.52x torch's plus the
# floor below. Factor 3 leaves room for that spread and still fails a graph whose error is several times the dtype's.
REDUCED_PRECISION_FACTOR = 3.0
# Unit in the last place at 1.0 of each reduced dtype (10 and 7 explicit mantissa bits); half of it times the
# reference's magnitude (the largest |logit|; for present statistics, the half's max |x|) is the floor of the
# allowed error.
ULP_AT_ONE = {"fp16": 2.0**-10, "bf16": 2.0**-7}

# Weight-only quantized bundles, against the fp32 reference. int8 must be tighter than int4. The reference prompts
# give at most 31 real positions, so one top-1 flip moves agreement by 3%: a flip counts only where the reference's
# own top-1 leads the candidate's choice by more than `tie_margin` logits (the criterion's allowed mean error), so
# a near tie that any rounding may turn cannot decide the verdict. Measured on the trained default model (the stored
# reference, 31 positions, onnxruntime 1.32 on this CPU): int8 top-1 1.000 (exact and tie-aware), mean abs 0.018;
# int4 exact top-1 0.871 (4 flips, each within 0.25 of the reference's top-1), tie-aware 1.000, mean abs 0.154 (its
# logits span about +-10). The bounds leave room for MatMulNBits' int8-activation kernels, which differ between CPU
# instruction sets; the mean error bound is what separates a sound int4 graph from a broken one.
QUANTIZED_CRITERIA = {
    "int8": {"min_top1": 0.97, "max_mean_abs": 0.05, "tie_margin": 0.05},
    "int4": {"min_top1": 0.80, "max_mean_abs": 0.25, "tie_margin": 0.25},
}


@dataclass
class OutputResult:
    """One output at one step: error statistics against the reference and whether it is within its bound."""

    name: str  # the main output's name, or present.{layer} (its statistics)
    max_abs: float
    mean_abs: float
    max_rel: float
    size: int  # values compared
    mismatches: int  # values beyond the bound (elementwise), or 1 when an aggregate bound is exceeded
    nonfinite: int
    first_nonfinite: list[int] | None
    bound: str
    ok: bool


@dataclass
class StepResult:
    step: int  # 0: the prefill
    outputs: list[OutputResult]
    top1: float  # at each row's last position
    top5: float
    top1_all: float  # over every real position of this step (near ties within the tie margin agree)
    positions: int

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


@dataclass
class ParityReport:
    """The one report: export's check, optimize's check and verify each produce and print one of these."""

    backend: str
    reference: str  # "stored" (the bundle's reference file) or "live torch <model dir>"
    dtype: str
    criterion: str  # "elementwise", "relative to torch <dtype>" or "quantized <scheme>"
    prompt_lengths: list[int]
    graph_sha256: dict[str, str]
    reference_sha256: str | None = None  # the stored reference file judged against (None: a live reference)
    steps: list[StepResult] = field(default_factory=list)
    greedy_reference: list[list[int]] = field(default_factory=list)
    greedy_candidate: list[list[int]] = field(default_factory=list)
    quantized: dict | None = None

    @property
    def compared(self) -> int:
        return sum(o.size for s in self.steps for o in s.outputs)

    @property
    def top1_agreement(self) -> float:
        """Teacher-forced top-1 agreement over every real position of every step."""
        n = sum(s.positions for s in self.steps)
        return sum(s.top1_all * s.positions for s in self.steps) / n if n else 0.0

    @property
    def mean_abs_logit_error(self) -> float:
        main = [s.outputs[0] for s in self.steps]
        n = sum(o.size for o in main)
        return sum(o.mean_abs * o.size for o in main) / n if n else float("nan")

    @property
    def ok(self) -> bool:
        if self.compared == 0:
            return False
        if any(o.nonfinite for s in self.steps for o in s.outputs):
            return False
        if self.quantized is not None:
            return (
                self.top1_agreement >= self.quantized["min_top1"]
                and self.mean_abs_logit_error <= self.quantized["max_mean_abs"]
            )
        return all(s.ok for s in self.steps)

    def first_failure(self) -> tuple[int, OutputResult] | None:
        for s in self.steps:
            for o in s.outputs:
                if not o.ok:
                    return s.step, o
        return None

    @property
    def greedy_first_divergence(self) -> tuple[int, int] | None:
        """(row, index) of the first token where the two greedy continuations differ, or None."""
        for row, (r, c) in enumerate(zip(self.greedy_reference, self.greedy_candidate)):
            for i, (a, b) in enumerate(zip(r, c)):
                if a != b:
                    return row, i
            if len(r) != len(c):
                return row, min(len(r), len(c))
        return None

    def summary(self) -> str:
        worst = max((s.outputs[0].max_abs for s in self.steps), default=float("nan"))
        return (
            f"parity {'ok' if self.ok else 'FAILED'}: {self.backend} vs {self.reference} fp32 reference, "
            f"prefill + {max(0, len(self.steps) - 1)} decode step(s), {self.compared} values, worst max abs "
            f"{self.steps[0].outputs[0].name if self.steps else 'output'} diff {worst:.3g} "
            f"({self.criterion})"
        )

    def failure_message(self) -> str | None:
        """One line naming the first failing step and output (its layer, for presents), or None when ok."""
        if self.ok:
            return None
        if self.compared == 0:
            return "nothing was compared (no real positions): the verdict needs evidence"
        for s in self.steps:
            for o in s.outputs:
                if o.nonfinite:
                    return (
                        f"{_step_name(s.step)}: {o.name} has {o.nonfinite} non-finite value(s), the first at index "
                        f"{o.first_nonfinite}"
                    )
        if self.quantized is not None:
            q = self.quantized
            return (
                f"quantized parity failed: top-1 agreement {self.top1_agreement:.3f} (needs >= {q['min_top1']}), "
                f"mean abs logit error {self.mean_abs_logit_error:.4f} (needs <= {q['max_mean_abs']})"
            )
        step, o = self.first_failure()
        return (
            f"parity failed at {_step_name(step)} on {o.name}: max abs diff {o.max_abs:.3g}, mean abs "
            f"{o.mean_abs:.3g}; allowed {o.bound}"
        )

    def raise_on_failure(self, what: str = "") -> None:
        message = self.failure_message()
        if message is not None:
            raise ParityError(f"{what}: {message}" if what else message)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(
            ok=self.ok,
            compared=self.compared,
            greedy_first_divergence=self.greedy_first_divergence,
            top1_agreement=self.top1_agreement,
            mean_abs_logit_error=self.mean_abs_logit_error,
        )
        return out

    def table(self) -> str:
        lines = [
            f"verify {self.backend} vs the {self.reference} fp32 reference ({self.dtype} graph; {self.criterion}), "
            f"prompts of {self.prompt_lengths} tokens",
            f"{'step':<10}{'output':<20}{'max abs':>10}{'mean abs':>10}{'max rel':>10}{'top-1':>7}{'top-5':>7}  result",
        ]
        for s in self.steps:
            for i, o in enumerate(s.outputs):
                top = f"{s.top1:>7.2f}{s.top5:>7.2f}" if i == 0 else " " * 14
                result = "ok" if o.ok else (f"FAIL ({o.mismatches}/{o.size})" if not o.nonfinite else "NON-FINITE")
                lines.append(
                    f"{_step_name(s.step):<10}{o.name:<20}{o.max_abs:>10.2e}{o.mean_abs:>10.2e}{o.max_rel:>10.2e}"
                    f"{top}  {result}"
                )
        divergence = self.greedy_first_divergence
        n = sum(len(r) for r in self.greedy_reference)
        if n == 0:
            lines.append("greedy continuation: not applicable (no cache or not causal-lm)")
        else:
            lines.append(
                "greedy continuation: "
                + (
                    "identical"
                    if divergence is None
                    else f"first divergence at row {divergence[0]}, token {divergence[1]}"
                )
                + f" ({n} reference tokens; informative)"
            )
        if self.quantized is not None:
            q = self.quantized
            lines.append(
                f"quantized: teacher-forced top-1 agreement {self.top1_agreement:.3f} over "
                f"{sum(st.positions for st in self.steps)} positions (near ties within {q['tie_margin']} agree; "
                f"needs >= {q['min_top1']}), "
                f"mean abs logit error {self.mean_abs_logit_error:.4f} (needs <= {q['max_mean_abs']}); "
                "the per-output bounds above are informative only"
            )
        lines.append(self.summary())
        return "\n".join(lines)


def _step_name(step: int) -> str:
    return "prefill" if step == 0 else f"decode {step}"


def _nonfinite(values: np.ndarray) -> tuple[int, list[int] | None]:
    bad = ~np.isfinite(values)
    count = int(bad.sum())
    return count, ([int(i) for i in np.argwhere(bad)[0]] if count else None)


def _errors(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - e)
    finite = diff[np.isfinite(diff)]
    rel = finite / np.maximum(np.abs(e[np.isfinite(diff)]), 1e-12)
    return (
        diff,
        float(finite.max()) if finite.size else float("nan"),
        float(finite.mean()) if finite.size else float("nan"),
        float(rel.max()) if rel.size else float("nan"),
    )


def _result(
    name: str, actual: np.ndarray, expected: np.ndarray, criterion: str, dtype: str, torch_error: np.ndarray | None
) -> OutputResult:
    """One output against its bound. torch_error: for reduced precision, the dtype model's error (max abs, mean abs)
    for the main output, or the absolute difference of each statistic for presents (same shape as `expected`)."""
    if actual.shape != expected.shape:
        raise ParityError(
            f"{name}: the candidate's shape {actual.shape} differs from the reference's {expected.shape} (a graph "
            "from another model, or a changed manifest)"
        )
    if not np.isfinite(expected).all() or (torch_error is not None and not np.isfinite(torch_error).all()):
        raise ParityError(f"{name}: the reference holds non-finite values and cannot judge anything")
    nonfinite, first = _nonfinite(actual)
    diff, max_abs, mean_abs, max_rel = _errors(actual, expected)
    size = int(diff.size)
    if criterion == "elementwise":
        atol, rtol = TOLERANCES["fp32"]
        bad = (diff > atol) & (diff > rtol * np.abs(expected))
        mismatches = int(bad.sum())
        bound = f"abs {atol:g} or rel {rtol:g} per value"
    elif criterion == "relative":
        half_ulp = ULP_AT_ONE[dtype] / 2
        factor = REDUCED_PRECISION_FACTOR
        if name.startswith("present."):
            allowed = factor * torch_error + half_ulp * np.abs(
                expected[..., -1:]
            )  # (2, 4); the last statistic is max |x|
            mismatches = int((diff > allowed).sum())
            bound = f"{factor:g}x torch {dtype}'s error per statistic + half an ulp"
        else:
            floor = half_ulp * float(np.abs(expected).max()) if expected.size else 0.0
            allowed_max = factor * float(torch_error[0]) + floor
            allowed_mean = factor * float(torch_error[1]) + floor
            mismatches = int(max_abs > allowed_max) + int(mean_abs > allowed_mean)
            bound = (
                f"max abs {allowed_max:.3g} and mean abs {allowed_mean:.3g} ({factor:g}x torch {dtype}'s + half an ulp)"
            )
    else:  # quantized: judged on aggregates by the report; this output's numbers are informative
        mismatches, bound = 0, "informative (quantized criteria)"
    ok = mismatches == 0 and nonfinite == 0 and size > 0
    return OutputResult(name, max_abs, mean_abs, max_rel, size, mismatches, nonfinite, first, bound, ok)


def _top1_agreement(candidate: np.ndarray, reference: np.ndarray, tie_margin: float) -> float:
    """Share of rows where the candidate's top-1 is the reference's, or trails the reference's top-1 by at most
    tie_margin in the reference's own logits (a near tie). (N, V) each; a NaN row never agrees."""
    if reference.shape[0] == 0:
        return 0.0
    rows = np.arange(reference.shape[0])
    chosen = np.nan_to_num(candidate, nan=-np.inf).argmax(-1)
    gap = reference.max(-1) - reference[rows, chosen]  # >= 0; 0 where both choose the same token
    agree = (gap <= tie_margin) & np.isfinite(candidate).all(-1)
    return float(agree.mean())


def _topk_agreement(candidate: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Share of rows whose reference top-1 is in the candidate's top-k. (N, V) each; NaN rows never agree."""
    if reference.shape[0] == 0:
        return 0.0
    ref_top1 = reference.argmax(-1)
    cand_topk = np.argsort(-np.nan_to_num(candidate, nan=-np.inf), axis=-1)[:, :k]
    return float(np.mean([r in c for r, c in zip(ref_top1, cand_topk)]))


def criterion_for(manifest: Manifest) -> tuple[str, str, dict | None]:
    """(kind, description, quantized criteria or None) for a bundle."""
    if manifest.quantization:
        scheme = manifest.quantization["scheme"]
        return "quantized", f"quantized {scheme}", QUANTIZED_CRITERIA[scheme]
    if manifest.dtype == "fp32":
        atol, rtol = TOLERANCES["fp32"]
        return "elementwise", f"elementwise, abs {atol:g} / rel {rtol:g}", None
    return "relative", f"within {REDUCED_PRECISION_FACTOR:g}x the error of torch {manifest.dtype} to fp32", None


def judge(reference: ReferenceOutputs, candidate: TeacherForced, manifest: Manifest, backend: str) -> ParityReport:
    """Compare a candidate's teacher-forced run (fed the reference's tokens) with the reference; one report.

    Raises ParityError when the reference cannot judge this bundle (a reduced-precision graph without the
    dtype model's error terms, or a candidate with other steps)."""
    kind, description, quantized = criterion_for(manifest)
    if kind == "relative" and (reference.main_error is None or reference.model_dtype != manifest.dtype):
        raise ParityError(
            f"the {reference.kind} reference has no error terms of a torch {manifest.dtype} model, which judging an "
            f"{manifest.dtype} graph needs; re-export the bundle with --dtype {manifest.dtype}"
        )
    if len(candidate.steps) != len(reference.run.steps):
        raise ParityError(f"the candidate ran {len(candidate.steps)} step(s), the reference {len(reference.run.steps)}")
    report = ParityReport(
        backend=backend,
        reference=reference.kind,
        dtype=manifest.dtype,
        criterion=description,
        prompt_lengths=[len(p) for p in reference.run.prompts],
        graph_sha256=dict(manifest.graph.sha256),
        reference_sha256=manifest.reference.sha256 if reference.kind == "stored" and manifest.reference else None,
        quantized=quantized,
    )
    main_name = manifest.main_output
    tie_margin = quantized["tie_margin"] if quantized else 0.0
    for i, (ref, cand) in enumerate(zip(reference.run.steps, candidate.steps)):
        ref_rows = ref.main
        if cand.main.shape[0] != ref_rows.shape[0] and manifest.logits_positions == "last":
            ref_rows = ref.main[ref.last]  # a last-token-logits graph: its rows are each batch row's last position
        main_error = reference.main_error[i] if reference.main_error is not None else None
        outputs = [_result(main_name, cand.main, ref_rows, kind, manifest.dtype, main_error)]
        if ref.present_stats is not None and cand.present_stats is not None:
            for layer in range(ref.present_stats.shape[0]):
                stats_error = reference.stats_error[i, layer] if reference.stats_error is not None else None
                outputs.append(
                    _result(
                        f"present.{layer}",
                        cand.present_stats[layer],
                        ref.present_stats[layer],
                        kind,
                        manifest.dtype,
                        stats_error,
                    )
                )
        if ref.main.shape[0] == 0 or cand.main.shape[0] == 0:  # nothing to rank; the verdict refuses it
            ref_last = cand_last = np.zeros((0, 0), dtype=np.float32)
        else:
            ref_last, cand_last = ref.main[ref.last], cand.main[cand.last]
        full = cand.main.shape[0] == ref.main.shape[0]
        report.steps.append(
            StepResult(
                step=i,
                outputs=outputs,
                top1=_topk_agreement(cand_last, ref_last, 1),
                top5=_topk_agreement(cand_last, ref_last, 5),
                top1_all=_top1_agreement(cand.main, ref.main if full else ref_last, tie_margin),
                positions=int(cand.main.shape[0]),
            )
        )
    report.greedy_reference = [list(r) for r in reference.greedy]
    return report
