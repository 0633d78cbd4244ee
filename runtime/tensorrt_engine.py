"""TensorRT engines, the parts shared by the builder and the backend: profiles, limits, I/O mapping, metadata, paths.

Everything here is pure (tested on the CPU) except `require_tensorrt`, the one guard that imports tensorrt and
cuda-python and names what is missing in one line. Facts from the TensorRT 10.x/11.x API (shared/notes/tensorrt.md):
a plan is tied to the TensorRT version and the GPU architecture, so both are stored beside it and checked on load;
I/O is by tensor name; a KV-cache decoder needs a prefill profile (past 0) and a decode profile (one new token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigcode_deploy.runtime.errors import BackendUnavailable, BigCodeError
from bigcode_deploy.runtime.manifest import BATCH, ENGINE_DIR, NUMPY_DTYPES, PAST, SEQUENCE, TOTAL, Manifest

PLAN_FILE, META_FILE = "model.plan", "engine.json"
# Manifest tensor dtype -> TensorRT DataType member name (what engine.get_tensor_dtype(name).name reports).
TRT_DTYPES = {"int64": "INT64", "float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}
PREFILL, DECODE = 0, 1  # optimization profile indices
PROFILE_NAMES = {PREFILL: "prefill", DECODE: "decode"}


# --- the target -------------------------------------------------------------------------------------------------
def require_tensorrt_target(manifest: Manifest, bundle_path: str | Path) -> None:
    """Raise BigCodeError (one line) unless the bundle was lowered for TensorRT (manifest.target == "tensorrt")."""
    if manifest.target != "tensorrt":
        raise BigCodeError(
            f"{bundle_path} targets {manifest.target}, not tensorrt: build-engine takes a tensorrt bundle; pass "
            f"--lower-to OUT_DIR to lower it into a new bundle first (or run `bigcode-deploy optimize {bundle_path} "
            "OUT_DIR --target tensorrt`)"
        )


# --- limits and profiles ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineLimits:
    """The engine's shape ranges, in tokens (prompt, context) and rows (batch)."""

    max_batch: int
    max_prompt: int
    max_context: int


def engine_limits(
    manifest: Manifest, max_batch: int | None, max_prompt: int | None, max_context: int | None
) -> EngineLimits:
    """The build options checked against the manifest's dims; None takes the default: batch, the manifest's batch
    range (8 if unbounded); context, n_positions; prompt, half the context. Raises BigCodeError naming the option."""
    if manifest.task != "causal-lm" or manifest.kv_cache is None:
        raise BigCodeError("build-engine needs a causal-lm bundle with a KV cache (exported without --no-cache)")
    n_positions = manifest.config["n_positions"]
    batch_max = manifest.dims[BATCH]["max"]
    limits = EngineLimits(
        max_batch=max_batch or batch_max or 8,
        max_context=max_context or n_positions,
        max_prompt=max_prompt or min(n_positions, max_context or n_positions) // 2,
    )
    if batch_max is not None and limits.max_batch > batch_max:
        raise BigCodeError(f"--max-batch {limits.max_batch} exceeds the bundle's batch range (max {batch_max})")
    if limits.max_batch < 1:
        raise BigCodeError(f"--max-batch {limits.max_batch} must be at least 1")
    if not 1 <= limits.max_context <= n_positions:
        raise BigCodeError(f"--max-context {limits.max_context} must be in 1..{n_positions} (the model's context)")
    if not 1 <= limits.max_prompt <= limits.max_context:
        raise BigCodeError(f"--max-prompt {limits.max_prompt} must be in 1..--max-context ({limits.max_context})")
    return limits


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape


def derive_profiles(manifest: Manifest, limits: EngineLimits) -> list[Profile]:
    """Two optimization profiles, [PREFILL, DECODE], each {input name: (min, opt, max) shape}.

    prefill: past_sequence 0, sequence 1..max_prompt; decode: sequence 1, past_sequence 1..max_context - 1 (so
    past + sequence never exceeds max_context). The symbolic dims of the manifest's input shapes are filled from
    these ranges; integer dims (heads, 2 * head_dim) are kept.
    """
    b = limits.max_batch
    batch = (1, max(1, b // 2), b)
    ranges = {
        PREFILL: {BATCH: batch, SEQUENCE: (1, max(1, limits.max_prompt // 2), limits.max_prompt), PAST: (0, 0, 0)},
        DECODE: {
            BATCH: batch,
            SEQUENCE: (1, 1, 1),
            PAST: (1, max(1, limits.max_context // 2), max(1, limits.max_context - 1)),
        },
    }
    profiles = []
    for index in (PREFILL, DECODE):
        points = [{dim: r[k] for dim, r in ranges[index].items()} for k in range(3)]
        for p in points:
            p[TOTAL] = p[PAST] + p[SEQUENCE]
        profiles.append({spec.name: tuple(_fill(spec.shape, points[k]) for k in range(3)) for spec in manifest.inputs})
    return profiles


def _fill(shape: list[str | int], sizes: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def profile_for(past_length: int) -> int:
    """The profile index for a step: PREFILL when the past is empty, else DECODE."""
    return PREFILL if past_length == 0 else DECODE


def input_shape_error(name: str, shape: Shape, profile: int, profiles: list[dict[str, list]]) -> str:
    """The one-line message for a shape that set_input_shape refused, with the profile's range for that input.

    profiles: EngineMetadata.profiles ({name: [min, opt, max]} per profile index).
    """
    label = PROFILE_NAMES.get(profile, str(profile))
    try:
        low, _, high = profiles[profile][name]
        allowed = f"allows {tuple(low)} to {tuple(high)}"
    except (IndexError, KeyError, ValueError):
        allowed = "has no range recorded for it"
    return (
        f"TensorRT refused shape {tuple(shape)} for input {name}: the engine's {label} profile {allowed}; rebuild "
        "the engine with larger --max-batch/--max-prompt/--max-context"
    )


# --- I/O --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorBinding:
    """One engine I/O tensor: its name (the graph's), mode ("input"/"output"), TensorRT dtype name, and the numpy
    dtype of the device buffer bound to it."""

    name: str
    mode: str
    trt_dtype: str
    dtype: np.dtype


def io_bindings(manifest: Manifest) -> list[TensorBinding]:
    """Manifest I/O -> bindings, inputs then outputs in graph order. Raises BigCodeError for a dtype TensorRT
    cannot bind here."""
    out = []
    for mode, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            if spec.dtype not in TRT_DTYPES:
                raise BigCodeError(f"{mode} {spec.name} has dtype {spec.dtype}, which has no TensorRT binding here")
            out.append(TensorBinding(spec.name, mode, TRT_DTYPES[spec.dtype], np.dtype(NUMPY_DTYPES[spec.dtype])))
    return out


def check_engine_io(found: dict[str, tuple[str, str]], manifest: Manifest, what: str = "the engine") -> None:
    """Check the I/O TensorRT reports against the manifest's: same names, modes and dtypes.

    found: {tensor name: (mode "input"/"output", TensorRT dtype name)}. Raises BigCodeError listing every
    difference in one line, with a rebuild hint.
    """
    expected = {b.name: (b.mode, b.trt_dtype) for b in io_bindings(manifest)}
    problems = [f"{name} missing" for name in expected if name not in found]
    problems += [f"unexpected {found[name][0]} {name}" for name in found if name not in expected]
    problems += [
        f"{name} is {found[name][0]} {found[name][1]}, the manifest says {mode} {dtype}"
        for name, (mode, dtype) in expected.items()
        if name in found and tuple(found[name]) != (mode, dtype)
    ]
    if problems:
        raise BigCodeError(
            f"{what}'s I/O does not match the manifest ({'; '.join(problems)}): rebuild the engine from this bundle "
            "with `bigcode-deploy build-engine`"
        )


# --- paths and metadata -----------------------------------------------------------------------------------------
def gpu_arch(compute_capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm90"."""
    return f"sm{compute_capability[0]}{compute_capability[1]}"


def engine_dir(bundle_path: str | Path, compute_capability: tuple[int, int], trt_version: str) -> Path:
    """bundle/engine/<gpu-arch>-trt<version>/: one plan per GPU architecture and TensorRT version."""
    return Path(bundle_path) / ENGINE_DIR / f"{gpu_arch(compute_capability)}-trt{trt_version}"


@dataclass
class EngineMetadata:
    """engine.json beside the plan: what it was built with and for (build_seconds in seconds)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: list[int]
    graph_sha256: dict[str, str]
    profiles: list[dict[str, list]]
    limits: dict[str, int]
    build_seconds: float

    @classmethod
    def read(cls, path: Path) -> EngineMetadata:
        """Raises BigCodeError (one line, with a rebuild hint) for a missing or malformed file."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise BigCodeError(f"{path} is not a readable engine description ({exc}); rebuild the engine") from None


def check_compatible(
    meta: EngineMetadata, tensorrt_version: str, compute_capability: tuple[int, int], graph_sha256: dict[str, str]
) -> None:
    """A plan runs only with the TensorRT version and GPU architecture it was built for, from the same graph.
    Raises BigCodeError naming the mismatch."""
    if meta.tensorrt_version != tensorrt_version:
        raise BigCodeError(
            f"the engine was built with TensorRT {meta.tensorrt_version}, this is TensorRT {tensorrt_version}: "
            "rebuild it with `bigcode-deploy build-engine`"
        )
    if tuple(meta.compute_capability) != tuple(compute_capability):
        raise BigCodeError(
            f"the engine was built for GPU architecture {gpu_arch(tuple(meta.compute_capability))} "
            f"({meta.gpu_name}), this GPU is {gpu_arch(compute_capability)}: rebuild it here"
        )
    if meta.graph_sha256 != graph_sha256:
        raise BigCodeError(
            "the engine was built from another graph (graph sha256 differs from the manifest's): rebuild it with "
            "`bigcode-deploy build-engine`"
        )


# --- the guard --------------------------------------------------------------------------------------------------
def require_tensorrt() -> Any:
    """The tensorrt module, once tensorrt and cuda-python import and a CUDA device is visible.

    Raises BackendUnavailable with one line naming what is missing (checked in that order).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not available: `import tensorrt` failed ({exc}); install the `tensorrt` extra on a machine "
            "with an NVIDIA GPU"
        ) from None
    from bigcode_deploy.runtime import cuda

    cuda.cudart()
    if cuda.device_count() == 0:
        raise BackendUnavailable(
            "TensorRT is installed but no CUDA device is visible (cudaGetDeviceCount failed or found none; check the "
            "driver, and that cuda-python's major version is not newer than the driver's CUDA)"
        )
    return trt
