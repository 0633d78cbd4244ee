"""Build a TensorRT engine for a tensorrt-target bundle: `bigcode-deploy build-engine`'s runtime half.

Written from the TensorRT 10.x/11.x Python API (shared/notes/tensorrt.md): a strongly typed network (precision
comes from the graph's dtypes), the ONNX parser with its errors in full, a workspace limit, a timing cache read and
saved, a prefill and a decode optimization profile, build_serialized_network. The plan and engine.json go to
BUNDLE/engine/<gpu-arch>-trt<version>/. A bundle of another target is refused (lowering it is a workflow's job:
bigcode_deploy.workflows.build_engine), before anything needs TensorRT.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.progress import Progress, print_progress, step
from bigcode_deploy.runtime.tensorrt_engine import (
    META_FILE,
    PLAN_FILE,
    EngineMetadata,
    check_engine_io,
    derive_profiles,
    engine_dir,
    engine_limits,
    require_tensorrt,
    require_tensorrt_target,
)


def build_engine(
    bundle_path: str | Path,
    *,
    max_batch: int | None = None,
    max_prompt: int | None = None,
    max_context: int | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    progress: Progress = print_progress,
) -> Path:
    """Build the plan of a tensorrt-target bundle; returns BUNDLE/engine/<gpu-arch>-trt<version>/model.plan.

    max_batch (rows), max_prompt and max_context (tokens): the profiles' ranges (defaults: engine_limits).
    timing_cache: a file read when present and written after the build. workspace_gb: TensorRT's workspace limit
    in GiB. Checked in this order, each a one-line BigCodeError: the bundle (BundleError), its target (tensorrt
    only), the limits, then TensorRT, cuda-python and a device (BackendUnavailable); then parser errors in full,
    a network whose I/O differs from the manifest, a failed build.
    """
    bundle = Bundle.open(bundle_path)
    manifest = bundle.manifest
    require_tensorrt_target(manifest, bundle.path)
    limits = engine_limits(manifest, max_batch, max_prompt, max_context)
    if workspace_gb <= 0:
        raise BigCodeError(f"--workspace-gb {workspace_gb} must be positive")
    profiles = derive_profiles(manifest, limits)
    trt = require_tensorrt()
    from bigcode_deploy.runtime.cuda import device_info

    gpu_name, capability = device_info()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED exists in 10.x and 11.x (where it is the only mode); EXPLICIT_BATCH must not be referenced.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with step(progress, f"parsing {bundle.graph_path}"):
        if not parser.parse_from_file(str(bundle.graph_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BigCodeError(f"TensorRT's ONNX parser rejected {bundle.graph_path}:\n{errors}")
    check_engine_io(network_io(network), manifest, what="the parsed network")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    start = time.perf_counter()
    with step(progress, f"building the engine for {gpu_name} (TensorRT {trt.__version__})"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BigCodeError("TensorRT failed to build the engine (see its log above)")
    meta = EngineMetadata(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=list(capability),
        graph_sha256=dict(manifest.graph.sha256),
        profiles=[{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles],
        limits=asdict(limits),
        build_seconds=round(time.perf_counter() - start, 1),
    )
    out = engine_dir(bundle.path, capability, trt.__version__)
    write_engine(out, bytes(plan), meta)
    if cache_file is not None:
        _write_atomically(cache_file, bytes(config.get_timing_cache().serialize()))
    progress(f"wrote {out / PLAN_FILE}")
    return out / PLAN_FILE


def network_io(network: Any) -> dict[str, tuple[str, str]]:
    """{name: (mode, TensorRT dtype name)} of a parsed INetworkDefinition's inputs and outputs."""
    io = {}
    for mode, count, get in (
        ("input", network.num_inputs, network.get_input),
        ("output", network.num_outputs, network.get_output),
    ):
        for i in range(count):
            tensor = get(i)
            io[tensor.name] = (mode, tensor.dtype.name)
    return io


def write_engine(out: Path, plan: bytes, meta: EngineMetadata) -> None:
    """Write model.plan and engine.json into `out`, each atomically; the old engine.json is removed first, so an
    interrupted write leaves a directory that loading refuses (rebuild) rather than a plan with another's metadata."""
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    _write_atomically(out / PLAN_FILE, plan)
    _write_atomically(out / META_FILE, (json.dumps(asdict(meta), indent=2) + "\n").encode())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _progress_monitor(trt: Any, progress: Progress) -> Any:
    """A TensorRT IProgressMonitor that reports top-level build phases, or None where the API lacks it."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                progress(f"  tensorrt: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()
