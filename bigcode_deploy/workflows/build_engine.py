"""`bigcode-deploy build-engine BUNDLE [--lower-to OUT_DIR] [--force]`: a TensorRT engine for a bundle.

A tensorrt-target bundle is built in place (its engine/ directory). Any other bundle is lowered first, and only
on request: --lower-to names the new tensorrt bundle (optimize_bundle with target tensorrt, fp16 unless the bundle
is bf16), which then receives the engine. Nothing is written anywhere the user did not name.
"""

from __future__ import annotations

from pathlib import Path

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.progress import Progress, print_progress
from bigcode_deploy.runtime.staging import refuse_existing
from bigcode_deploy.runtime.tensorrt_build import build_engine
from bigcode_deploy.runtime.tensorrt_engine import require_tensorrt, require_tensorrt_target


def build_engine_for(
    bundle_path: str | Path,
    *,
    lower_to: Path | None = None,
    force: bool = False,
    max_batch: int | None = None,
    max_prompt: int | None = None,
    max_context: int | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    same_compute_capability: bool = False,
    detailed_profile: bool = False,
    progress: Progress = print_progress,
) -> Path:
    """Build the engine of BUNDLE, lowering it into `lower_to` first when it is not a tensorrt bundle.

    Returns the plan's path (under lower_to/engine/ when lowered, else under bundle_path/engine/). force: replace
    an existing lower_to. The engine options are bigcode_deploy.runtime.tensorrt_build.build_engine's.
    Raises BigCodeError (one line), in this order: a non-tensorrt bundle without lower_to, lower_to with a
    tensorrt bundle (nothing to lower), a lower_to that is (or holds) BUNDLE or exists without force,
    BackendUnavailable before lowering where no engine could be built after it; then whatever lowering or building
    raises.
    """
    bundle = Bundle.open(bundle_path)
    target = bundle.manifest.target
    if target == "tensorrt" and lower_to is not None:
        raise BigCodeError(f"{bundle_path} already targets tensorrt: drop --lower-to to build its engine in place")
    if target != "tensorrt":
        if lower_to is None:
            require_tensorrt_target(bundle.manifest, bundle_path)  # raises, saying what to do
        from bigcode_deploy.workflows.optimize import optimize_bundle

        refuse_existing(lower_to, force, inputs=[bundle_path])  # before anything slow: never over BUNDLE itself
        require_tensorrt()  # before a lowering that could not be followed by a build here
        dtype = "bf16" if bundle.manifest.dtype == "bf16" else "fp16"
        # The lowered manifest records the batch range the engine's profiles may use.
        batch = {"max_batch": max_batch} if max_batch is not None else {}
        progress(f"{bundle_path} targets {target}: lowering it to {lower_to} (tensorrt, {dtype}) first")
        if dtype == "bf16":  # ONNX Runtime's CPU provider has no bf16 kernels; the engine is verified after the build
            progress(
                "the bf16 graph is not checked on ONNX Runtime here: run `verify --backend tensorrt` after the build"
            )
        bundle_path = optimize_bundle(
            bundle.path,
            lower_to,
            target="tensorrt",
            dtype=dtype,
            force=force,
            check=dtype != "bf16",
            progress=progress,
            **batch,
        )
    return build_engine(
        bundle_path,
        max_batch=max_batch,
        max_prompt=max_prompt,
        max_context=max_context,
        timing_cache=timing_cache,
        workspace_gb=workspace_gb,
        same_compute_capability=same_compute_capability,
        detailed_profile=detailed_profile,
        progress=progress,
    )
