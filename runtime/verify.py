"""`bigcode-deploy verify BUNDLE`: a bundle on a backend against its stored torch reference, with no torch and no
checkpoint (like Polygraphy's saved outputs). The live-torch form (`--model DIR`) is bigcode_deploy.workflows.verify;
both end in `verify_against` and the one verdict of runtime/parity.py.

Teacher-forced: the candidate gets the reference's tokens at the prefill and at every decode step and feeds back its
own presents. Then, informatively, each side's free-running greedy continuation. The report goes to parity.json,
bound to the graph's sha256, the backend and the reference it was judged against.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from bigcode_deploy.runtime.backends import open_backend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError, BundleError
from bigcode_deploy.runtime.generate import GenerationOptions, generate
from bigcode_deploy.runtime.manifest import PARITY_FILE
from bigcode_deploy.runtime.parity import ParityReport, judge
from bigcode_deploy.runtime.reference import ReferenceOutputs, teacher_forced
from bigcode_deploy.runtime.session import DecodingSession


def verify_against(reference: ReferenceOutputs, bundle: Bundle, backend, backend_name: str) -> ParityReport:
    """Run an entered backend on the reference's prompts and tokens; judge it. Returns the report (not raised)."""
    steps = len(reference.run.steps) - 1
    candidate = teacher_forced(backend.run, bundle.manifest, reference.run.prompts, reference.run.tokens, steps)
    report = judge(reference, candidate, bundle.manifest, backend_name)
    if reference.greedy and reference.greedy[0] and bundle.manifest.task == "causal-lm" and bundle.kv_cache:
        options = GenerationOptions(max_new_tokens=len(reference.greedy[0]), stop_token_ids=())
        try:
            report.greedy_candidate = generate(DecodingSession(backend, bundle), reference.run.prompts, options)
        except BigCodeError:  # informative only: non-finite logits (already failed above), or no room to generate
            report.greedy_candidate = []
    return report


def verify_bundle(
    bundle_path: str | Path, *, backend: str = "ort", threads: int = 0, write: bool = True
) -> ParityReport:
    """Judge BUNDLE on a runtime backend (ort, ort-cuda, tensorrt) against its stored reference outputs.

    Returns the report (check report.ok, or call report.raise_on_failure()); writes parity.json when `write`.
    Raises BundleError for a bundle without (or with a changed) reference file, BackendUnavailable for a backend
    missing here."""
    bundle = Bundle.open(bundle_path)
    reference = ReferenceOutputs.load(bundle)
    with open_backend(bundle, backend, threads=threads) as b:
        report = verify_against(reference, bundle, b, backend)
    if write:
        write_parity(bundle.path, report)  # False on a read-only bundle: the verdict stands, the file is skipped
    return report


def write_parity(bundle_dir: Path, report: ParityReport) -> bool:
    """parity.json, replaced atomically (a reader never sees half a file). Returns whether it was written: False,
    writing nothing, when the bundle directory is read-only (EACCES, EPERM, EROFS) or full (ENOSPC, EDQUOT); the
    verdict stands either way."""
    path = Path(bundle_dir) / PARITY_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # never left behind, whatever failed
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise BundleError(
                f"cannot write {path} ({exc.strerror or type(exc).__name__}); remove what stands at that name"
            ) from None
        return False
    return True
