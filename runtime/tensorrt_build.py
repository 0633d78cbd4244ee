"""Build a TensorRT engine for a tensorrt-target bundle: `bigcode-deploy build-engine`'s runtime half.

Written from the TensorRT 10.x/11.x Python API (shared/notes/tensorrt.md): a strongly typed network (precision
comes from the graph's dtypes), the graph's opset checked against this TensorRT's parser, the ONNX parser with its
errors in full, a workspace limit, a timing cache per GPU model and TensorRT version (read, checked, saved
atomically), a prefill and a decode optimization profile (each index checked), the hardware compatibility level
(default: this GPU model only; SAME_COMPUTE_CAPABILITY on request where the version has it),
build_serialized_network. The plan and engine.json (which records the level) go to
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
    HW_COMPAT_NONE,
    HW_COMPAT_SAME_CC,
    META_FILE,
    PLAN_FILE,
    PROFILE_NAMES,
    EngineMetadata,
    check_engine_io,
    check_opset,
    derive_profiles,
    engine_dir,
    engine_limits,
    require_tensorrt,
    require_tensorrt_target,
    timing_cache_file,
    trt_logger,
)


def build_engine(
    bundle_path: str | Path,
    *,
    max_batch: int | None = None,
    max_prompt: int | None = None,
    max_context: int | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    same_compute_capability: bool = False,
    detailed_profile: bool = False,
    progress: Progress = print_progress,
) -> Path:
    """Build the plan of a tensorrt-target bundle; returns BUNDLE/engine/<gpu-arch>-trt<version>/model.plan.

    max_batch (rows), max_prompt and max_context (tokens): the profiles' ranges (defaults: engine_limits).
    timing_cache: a directory holding one timing cache per GPU model and TensorRT version (timing_cache_file), read
    when present and written atomically after the build. workspace_gb: TensorRT's workspace limit in GiB.
    same_compute_capability: build with HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY (the plan then loads on
    any GPU of this compute capability; refused where this TensorRT lacks it). detailed_profile: ProfilingVerbosity
    DETAILED, so the engine inspector shows each layer's parameters (scripts/gpu_check.py uses it).
    Checked in this order, each a one-line BigCodeError: workspace_gb, the bundle (BundleError), its target (tensorrt
    only), the limits, then TensorRT, cuda-python and a device (BackendUnavailable), the opset against this TensorRT's
    parser; then parser errors in full, a network whose I/O differs from the manifest, a refused timing cache or
    profile, a failed build.
    """
    if isinstance(workspace_gb, bool) or not isinstance(workspace_gb, (int, float)) or not 0 < workspace_gb < 1 << 20:
        raise BigCodeError(f"--workspace-gb {str(workspace_gb)[:40]} must be a number of GiB in (0, {1 << 20})")
    bundle = Bundle.open(bundle_path)
    manifest = bundle.manifest
    require_tensorrt_target(manifest, bundle.path)
    limits = engine_limits(manifest, max_batch, max_prompt, max_context)
    profiles = derive_profiles(manifest, limits)
    trt = require_tensorrt()
    from bigcode_deploy.runtime.cuda import device_info

    check_opset(manifest.opset, trt.__version__)
    gpu_name, capability = device_info()
    hardware = hardware_compatibility(trt, same_compute_capability)

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED exists in 10.x and 11.x (where it is the only mode); EXPLICIT_BATCH must not be referenced.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with step(progress, f"parsing {bundle.graph_path}"):
        if not parser.parse_from_file(str(bundle.graph_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BigCodeError(f"TensorRT's ONNX parser rejected {bundle.graph_path}:\n{errors}")
    check_engine_io(network_io(network), manifest, what="the parsed network")
    check_output_shapes(network, manifest)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hardware == HW_COMPAT_SAME_CC:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    if detailed_profile:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_file = timing_cache_file(timing_cache, gpu_name, capability, trt.__version__) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):  # ignore_mismatch False: refuse another GPU's
        raise BigCodeError(
            f"TensorRT refused the timing cache {cache_file} (another GPU or TensorRT version, or a damaged file): "
            "delete it and build again"
        )
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    add_profiles(builder, config, profiles)

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
        hardware_compatibility=hardware,
    )
    out = engine_dir(bundle.path, capability, trt.__version__, gpu_name if hardware == HW_COMPAT_NONE else None)
    write_engine(out, bytes(plan), meta)
    if cache_file is not None:
        save_timing_cache(config, cache_file, progress)
    progress(f"wrote {out / PLAN_FILE}")
    return out / PLAN_FILE


def hardware_compatibility(trt: Any, same_compute_capability: bool) -> str:
    """The level to build with (HW_COMPAT_NONE or HW_COMPAT_SAME_CC). Raises BigCodeError when SAME_COMPUTE_CAPABILITY
    is asked for and this TensorRT has no such HardwareCompatibilityLevel."""
    if not same_compute_capability:
        return HW_COMPAT_NONE
    levels = getattr(trt, "HardwareCompatibilityLevel", None)
    if levels is None or not hasattr(levels, HW_COMPAT_SAME_CC):
        raise BigCodeError(
            f"--same-compute-capability: TensorRT {trt.__version__} has no HardwareCompatibilityLevel."
            f"{HW_COMPAT_SAME_CC}; build without it (the engine then runs on this GPU model only)"
        )
    return HW_COMPAT_SAME_CC


def add_profiles(builder: Any, config: Any, profiles: list[dict]) -> None:
    """Add the profiles in order; each must land at its index (PREFILL, DECODE). Raises BigCodeError when TensorRT
    refuses one (add_optimization_profile returns -1 for an invalid profile)."""
    for expected, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            try:  # the binding raises RuntimeError for a shape range it refuses (it returns nothing)
                profile.set_shape(name, low, opt, high)
            except RuntimeError as exc:
                raise BigCodeError(
                    f"TensorRT refused the shape range of {name} in the {PROFILE_NAMES.get(expected, expected)} "
                    f"profile ({low}..{high}, opt {opt}): {str(exc).splitlines()[0] if str(exc) else 'no reason'}"
                ) from None
        index = config.add_optimization_profile(profile)
        if index != expected:
            label = PROFILE_NAMES.get(expected, str(expected))
            ranges = "; ".join(f"{name} {low}..{high}" for name, (low, _, high) in shapes.items())
            raise BigCodeError(
                f"TensorRT refused the {label} optimization profile (index {index}, expected {expected}): {ranges}"
            )


def save_timing_cache(config: Any, cache_file: Path, progress: Progress) -> None:
    """Write the builder's timing cache atomically; says so in one line when TensorRT has none to give."""
    cache = config.get_timing_cache()
    if cache is None:
        progress(f"TensorRT returned no timing cache after the build: {cache_file} not written")
        return
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(cache_file, bytes(cache.serialize()))


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


def check_output_shapes(network: Any, manifest: Any) -> None:
    """The parsed network's output dims against the manifest's: every static dim of the manifest (logits
    (batch, 1, vocab) with last-token logits, 2 * head_dim of the presents) must be what TensorRT infers; dynamic
    dims (-1) are not compared. Raises BigCodeError listing the differences."""
    expected = {spec.name: spec.shape for spec in manifest.outputs}
    problems = []
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        shape = expected.get(tensor.name)
        dims = tuple(tensor.shape)
        if shape is None:
            continue
        if len(dims) != len(shape) or any(isinstance(s, int) and d >= 0 and d != s for d, s in zip(dims, shape)):
            problems.append(f"{tensor.name} is {dims}, the manifest says {tuple(shape)}")
    if problems:
        raise BigCodeError(f"the parsed network's output shapes differ from the manifest ({'; '.join(problems)})")


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
