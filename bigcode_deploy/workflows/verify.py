"""`bigcode-deploy verify BUNDLE --model DIR` (or `--backend torch`): against the live torch reference computed from
a checkpoint now, instead of the outputs stored in the bundle. Same prompts, same run, same verdict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.parity import ParityReport
from bigcode_deploy.runtime.reference import STEPS
from bigcode_deploy.runtime.verify import verify_against, verify_bundle, write_parity


def verify_bundle_live(
    bundle_path: str | Path,
    *,
    model_dir: str | Path | None = None,
    backend: str = "ort",
    steps: int = STEPS,
    seed: int = 0,
    threads: int = 0,
    write: bool = True,
) -> ParityReport:
    """Judge BUNDLE on `backend` against the fp32 torch reference of model_dir (default: the checkpoint recorded in
    the manifest), teacher-forced over the reference prompts (seeded) and `steps` cached decode steps.

    Raises BigCodeError for steps < 1 or a missing checkpoint, CheckpointError for a checkpoint whose files'
    sha256 differ from the manifest's record (the recorded one changed, or model_dir holds another checkpoint), and
    what loading the checkpoint raises."""
    if steps < 1:
        raise BigCodeError(f"--steps {steps}: verify needs at least 1 cached decode step after the prefill")
    if seed < 0:
        raise BigCodeError(f"--seed {seed} must be a non-negative integer")
    bundle = Bundle.open(bundle_path)
    source = Path(model_dir) if model_dir is not None else Path(bundle.manifest.source.get("model_dir", ""))
    if not source.is_dir():
        raise BigCodeError(
            f"the live torch reference needs the checkpoint: {source} does not exist; pass --model MODEL_DIR, or "
            "verify against the bundle's stored reference (no --model)"
        )
    # torch and the exporter load here, not at import: `verify BUNDLE` against stored outputs never needs them.
    from bigcode_deploy.exporter.checkpoint import check_same_model, check_source
    from bigcode_deploy.exporter.reference_capture import reference_outputs
    from bigcode_deploy.workflows.backends import open_any_backend

    check_same_model(source, bundle.manifest.config)
    check_source(source, bundle.manifest.source)
    reference = reference_outputs(
        source, bundle.manifest, steps=steps, seed=seed, kind=f"live torch {source}", threads=threads
    )
    with open_any_backend(bundle, backend, model_dir=source, threads=threads, source_checked=True) as b:
        report = verify_against(reference, bundle, b, backend)
    if write:
        write_parity(bundle.path, report)
    return report


def verify(
    bundle_path,
    *,
    model_dir=None,
    backend="ort",
    steps: int | None = None,
    seed: int | None = None,
    threads=0,
    write=True,
    note: Callable[[str], None] = lambda message: None,
) -> ParityReport:
    """The CLI's verify: against the bundle's stored reference, or the live torch reference when a checkpoint
    (--model) or the torch backend is asked for. Other steps or prompt seeds need the live reference (the stored
    one has fixed, recorded prompts): asking for them without --model raises BigCodeError.

    With write, parity.json goes into the bundle; on a read-only bundle it is skipped and `note` gets one line."""
    if model_dir is None and backend != "torch":
        if steps is not None or seed is not None:
            raise BigCodeError(
                "--steps and --seed choose a new live reference: pass --model MODEL_DIR too (the stored reference has "
                "the prompts and steps recorded in manifest.json)"
            )
        report = verify_bundle(bundle_path, backend=backend, threads=threads, write=False)
    else:
        report = verify_bundle_live(
            bundle_path,
            model_dir=model_dir,
            backend=backend,
            steps=STEPS if steps is None else steps,
            seed=0 if seed is None else seed,
            threads=threads,
            write=False,
        )
    if write and not write_parity(Path(bundle_path), report):
        note(f"note: {bundle_path} is read-only: parity.json not written (the verdict is shown, not recorded)")
    return report
