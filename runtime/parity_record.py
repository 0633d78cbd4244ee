"""parity.json as evidence: what a verdict was bound to, and whether that binding still holds.

verify writes the report with the graph's sha256, the backend, the reference kind and the criterion it applied.
Anything that reports parity (inspect, the C ABI's bundle info) reads it through `parity_summary`, which says
"none" (with the reason) when the file is missing, unreadable, or bound to another graph or reference.
"""

from __future__ import annotations

import json
from typing import Any

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.manifest import PARITY_FILE

# The fields of a report that a summary carries.
SUMMARY_FIELDS = (
    "ok",
    "backend",
    "reference",
    "dtype",
    "criterion",
    "compared",
    "top1_agreement",
    "mean_abs_logit_error",
    "greedy_first_divergence",
)


def parity_summary(bundle: Bundle) -> dict[str, Any]:
    """{"status": "ok" | "failed" | "none", "reason": str | None, and the report's SUMMARY_FIELDS when bound}.

    "none" when there is no parity.json, when it cannot be read, or when it was written for another graph
    (its graph_sha256 differs from the manifest's) or against a reference other than the bundle's stored one or a
    live one. Never raises for a bad file: a report that cannot be trusted is reported as absent."""
    path = bundle.path / PARITY_FILE
    if not path.is_file():
        return {"status": "none", "reason": f"no {PARITY_FILE} (run `bigcode-deploy verify`)"}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "none", "reason": f"{PARITY_FILE} is not readable JSON"}
    if not isinstance(report, dict):
        return {"status": "none", "reason": f"{PARITY_FILE} is not a report"}
    if report.get("graph_sha256") != bundle.manifest.graph.sha256:
        return {"status": "none", "reason": f"{PARITY_FILE} was written for another graph (sha256 differs)"}
    reference = report.get("reference")
    if not isinstance(reference, str) or not (reference == "stored" or reference.startswith("live torch ")):
        return {"status": "none", "reason": f"{PARITY_FILE} names no known reference"}
    stored = bundle.manifest.reference
    if reference == "stored" and (stored is None or report.get("reference_sha256") != stored.sha256):
        return {"status": "none", "reason": f"{PARITY_FILE} was judged against another stored reference"}
    steps = report.get("steps")
    outputs = [o for s in steps for o in s.get("outputs", [])] if isinstance(steps, list) else None
    if not outputs or not all(isinstance(o, dict) for o in outputs):
        return {"status": "none", "reason": f"{PARITY_FILE} holds no per-output results"}
    if report.get("ok") is True and any(
        o.get("nonfinite") or (o.get("ok") is not True and not report.get("quantized")) for o in outputs
    ):
        return {"status": "none", "reason": f"{PARITY_FILE} says ok over failed outputs (edited?)"}
    if not all(isinstance(report.get(k), str) for k in ("backend", "criterion", "dtype")):
        return {"status": "none", "reason": f"{PARITY_FILE} does not say what judged what"}
    if not isinstance(report.get("ok"), bool) or not isinstance(report.get("compared"), int):
        return {"status": "none", "reason": f"{PARITY_FILE} lacks a verdict"}
    ok = report["ok"] and report["compared"] > 0
    return {"status": "ok" if ok else "failed", "reason": None, **{k: report.get(k) for k in SUMMARY_FIELDS}}
