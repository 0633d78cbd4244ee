"""`bigcode-deploy verify`: a bundle on a backend against the torch reference, step by step.

Teacher-forced: both sides get the same tokens (the reference's greedy choice) at the prefill and every decode
step; each keeps its own cache. Compared per step: logits at every real (non-pad) position and every present,
with max/mean abs diff, max relative error, top-1 and top-5 agreement at each row's last position. Then the
greedy continuation of each side on its own, token by token. Writes parity.json into the bundle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends import TorchBackend, open_backend
from runtime.bundle import Bundle, left_pad, position_ids
from runtime.generate import GenerationOptions, generate
from runtime.parity import QUANTIZED_CRITERIA, TOLERANCES, Comparison, ParityError, compare
from runtime.session import DecodingSession


@dataclass
class StepReport:
    step: int
    logits: Comparison
    presents: Comparison | None
    top1: float  # at each row's last position
    top5: float
    top1_all: float = 1.0  # over every real position of this step
    positions: int = 0

    @property
    def ok(self) -> bool:
        return self.logits.ok and (self.presents is None or self.presents.ok)


@dataclass
class VerifyReport:
    backend: str
    dtype: str
    atol: float
    rtol: float
    prompt_lengths: list[int]
    steps: list[StepReport] = field(default_factory=list)
    greedy_reference: list[list[int]] = field(default_factory=list)
    greedy_candidate: list[list[int]] = field(default_factory=list)
    quantized: dict | None = None  # QUANTIZED_CRITERIA of the bundle's scheme, when it is quantized

    @property
    def top1_agreement(self) -> float:
        """Teacher-forced top-1 agreement over every real position of every step."""
        n = sum(s.positions for s in self.steps)
        return sum(s.top1_all * s.positions for s in self.steps) / n if n else 1.0

    @property
    def mean_abs_logit_error(self) -> float:
        n = sum(s.logits.size for s in self.steps)
        return sum(s.logits.mean_abs * s.logits.size for s in self.steps) / n if n else 0.0

    @property
    def ok(self) -> bool:
        if self.quantized is not None:
            return (self.top1_agreement >= self.quantized["min_top1"]
                    and self.mean_abs_logit_error <= self.quantized["max_mean_abs"])
        return all(s.ok for s in self.steps)

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

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        out["greedy_first_divergence"] = self.greedy_first_divergence
        out["top1_agreement"] = self.top1_agreement
        out["mean_abs_logit_error"] = self.mean_abs_logit_error
        return out

    def table(self) -> str:
        lines = [
            f"verify {self.backend} vs torch ({self.dtype}; fail when beyond abs {self.atol:g} and rel {self.rtol:g}), "
            f"prompts of {self.prompt_lengths} tokens",
            f"{'step':<10}{'output':<10}{'max abs':>10}{'mean abs':>10}{'max rel':>10}{'top-1':>7}{'top-5':>7}  result",
        ]
        for s in self.steps:
            name = "prefill" if s.step == 0 else f"decode {s.step}"
            for label, c in (("logits", s.logits), ("presents", s.presents)):
                if c is None:
                    continue
                top = (f"{s.top1:>7.2f}{s.top5:>7.2f}" if label == "logits" else " " * 14)
                lines.append(f"{name:<10}{label:<10}{c.max_abs:>10.2e}{c.mean_abs:>10.2e}{c.max_rel:>10.2e}{top}  "
                             + ("ok" if c.ok else f"FAIL ({c.mismatches}/{c.size})"))
        divergence = self.greedy_first_divergence
        n = sum(len(r) for r in self.greedy_reference)
        lines.append("greedy continuation: " + ("identical" if divergence is None else
                     f"first divergence at row {divergence[0]}, token {divergence[1]}") + f" ({n} reference tokens)")
        if self.quantized is not None:
            q = self.quantized
            lines.append(f"quantized: teacher-forced top-1 agreement {self.top1_agreement:.3f} (needs >= {q['min_top1']}), "
                         f"mean abs logit error {self.mean_abs_logit_error:.4f} (needs <= {q['max_mean_abs']}); "
                         "elementwise results above are informative only")
        lines.append("parity " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


def mixed_prompts(vocab_size: int, n_positions: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    longest = max(2, min(12, n_positions // 4))
    return [rng.integers(0, vocab_size, n).tolist() for n in (longest, max(1, longest // 2), 1)]


def _topk_agreement(candidate: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Share of rows whose reference top-1 token is in the candidate's top-k. (B, V) each."""
    ref_top1 = reference.argmax(-1)
    cand_topk = np.argsort(-candidate, axis=-1)[:, :k]
    return float(np.mean([r in c for r, c in zip(ref_top1, cand_topk)]))


def _merge(comparisons: list[Comparison], name: str) -> Comparison:
    return Comparison(
        name=name,
        max_abs=max(c.max_abs for c in comparisons),
        mean_abs=float(np.mean([c.mean_abs for c in comparisons])),
        max_rel=max(c.max_rel for c in comparisons),
        mismatches=sum(c.mismatches for c in comparisons),
        size=sum(c.size for c in comparisons),
    )


def teacher_forced(reference, candidate, bundle: Bundle, prompts: list[list[int]], steps: int, atol: float,
                   rtol: float) -> list[StepReport]:
    """Run both backends (`run`: named arrays in and out) on the same tokens: the prompts, then `steps` cached
    decode steps whose tokens are the reference's greedy choices. Each side feeds back its own presents.

    The main output (logits or hidden states) is compared at the real (non-pad) positions; a candidate with
    last-token logits is compared at the last position; a pooled (B, labels) output as a whole.
    """
    past_names, present_names = bundle.past_names(), bundle.present_names()
    main_name = bundle.output_names[0]
    ids, mask = left_pad(prompts)
    feeds_ref = {"input_ids": ids, "attention_mask": mask, **bundle.empty_past(len(prompts))}
    feeds_cand = dict(feeds_ref)
    new_mask = mask  # which of this step's new positions are real tokens
    reports = []
    for step in range(steps + 1 if past_names else 1):
        past_length = feeds_ref["attention_mask"].shape[1] - feeds_ref["input_ids"].shape[1]
        if "position_ids" in bundle.input_names:
            positions = position_ids(feeds_ref["attention_mask"], past_length)
            feeds_ref["position_ids"] = feeds_cand["position_ids"] = positions
        out_ref, out_cand = reference.run(feeds_ref), candidate.run(feeds_cand)
        ref_main = out_ref[main_name].astype(np.float32)
        cand_main = out_cand[main_name].astype(np.float32)
        if ref_main.ndim == 3:
            real = new_mask.astype(bool)
            if cand_main.shape[1] != ref_main.shape[1]:  # a bundle with last-token logits
                ref_main, real = ref_main[:, -1:], real[:, -1:]
            ref_rows, cand_rows = ref_main[real], cand_main[real]  # (real positions, V)
            ref_last, cand_last = ref_main[:, -1], cand_main[:, -1]
        else:
            ref_rows = ref_last = ref_main
            cand_rows = cand_last = cand_main
        presents_cmp = _merge([compare(n, out_cand[n], out_ref[n], atol, rtol) for n in present_names],
                              "presents") if present_names else None
        reports.append(StepReport(
            step, compare(main_name, cand_rows, ref_rows, atol, rtol), presents_cmp,
            top1=_topk_agreement(cand_last, ref_last, 1),
            top5=_topk_agreement(cand_last, ref_last, 5),
            top1_all=_topk_agreement(cand_rows, ref_rows, 1),
            positions=int(ref_rows.shape[0]),
        ))
        if step == steps or not past_names:
            break
        next_ids = ref_last.argmax(-1)[:, None].astype(np.int64)  # teacher forcing
        new_mask = np.ones_like(next_ids)
        grown = np.concatenate([feeds_ref["attention_mask"], new_mask], axis=1)
        feeds_ref = {"input_ids": next_ids, "attention_mask": grown,
                     **{p: out_ref[q] for p, q in zip(past_names, present_names)}}
        feeds_cand = {"input_ids": next_ids, "attention_mask": grown,
                      **{p: out_cand[q] for p, q in zip(past_names, present_names)}}
    return reports


def verify_bundle(
    bundle_path: str | Path, *, model_dir: str | Path | None = None, backend: str = "ort", steps: int = 4,
    greedy_tokens: int = 8, seed: int = 0, threads: int = 0, write: bool = True,
) -> VerifyReport:
    bundle = Bundle.open(bundle_path)
    dtype = bundle.manifest["dtype"]
    atol, rtol = TOLERANCES[dtype]
    config = bundle.config
    prompts = mixed_prompts(config["vocab_size"], config["n_positions"], seed)
    steps = min(steps, config["n_positions"] - max(len(p) for p in prompts))
    greedy_tokens = min(greedy_tokens, config["n_positions"] - max(len(p) for p in prompts))
    report = VerifyReport(backend=backend, dtype=dtype, atol=atol, rtol=rtol, prompt_lengths=[len(p) for p in prompts])
    if bundle.manifest.get("quantization"):
        report.quantized = QUANTIZED_CRITERIA[bundle.manifest["quantization"]["scheme"]]
    with TorchBackend(bundle, model_dir=model_dir, threads=threads) as reference, \
            open_backend(bundle, backend, model_dir=model_dir, threads=threads) as candidate:
        report.steps = teacher_forced(reference, candidate, bundle, prompts, steps, atol, rtol)
        if bundle.past_names() and greedy_tokens > 0:
            options = GenerationOptions(max_new_tokens=greedy_tokens, stop_token_ids=())
            report.greedy_reference = generate(DecodingSession(reference, bundle), prompts, options)
            report.greedy_candidate = generate(DecodingSession(candidate, bundle), prompts, options)
    if write:
        _write_json_atomic(bundle.path / "parity.json", report.to_json())
    return report


def raise_on_failure(report: VerifyReport) -> None:
    if report.quantized is not None:
        if not report.ok:
            raise ParityError(
                f"quantized parity failed: top-1 agreement {report.top1_agreement:.3f} (needs >= "
                f"{report.quantized['min_top1']}), mean abs logit error {report.mean_abs_logit_error:.4f} "
                f"(needs <= {report.quantized['max_mean_abs']})"
            )
        return
    for s in report.steps:
        for c in (s.logits, s.presents):
            if c is not None and not c.ok:
                name = "prefill" if s.step == 0 else f"decode step {s.step}"
                raise ParityError(
                    f"parity failed at {name} on {c.name}: max abs diff {c.max_abs:.3g}, {c.mismatches}/{c.size} "
                    f"values beyond abs {report.atol:g} and rel {report.rtol:g}"
                )


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
