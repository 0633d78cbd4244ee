"""TensorRT engines, the parts shared by the builder and the backend: profiles, limits, I/O mapping, metadata, paths.

Everything here is pure (tested on the CPU) except `require_tensorrt`, the one guard that imports tensorrt and
cuda-python and names what is missing in one line. Facts from the TensorRT 10.x/11.x API (shared/notes/tensorrt.md):
a plan is tied to the TensorRT version and the GPU architecture, so both are stored beside it and checked on load;
I/O is by tensor name; a KV-cache decoder needs a prefill profile (past 0) and a decode profile (one new token).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
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
# The opsets onnx-tensorrt's importer accepts, by the first TensorRT version that accepts them (its
# docs/operators.md: "TensorRT 10.0 supports ... opset 9 to opset 20", "TensorRT 10.15 ... 9 to opset 24", 11.2 the
# same). Versions between 10.0 and 10.15 are held to 10.0's range: no source here says they parse more.
MIN_OPSET = 9
PARSER_MAX_OPSET = {(10, 0): 20, (10, 15): 24}
# IBuilderConfig.hardware_compatibility_level values this project builds with (engine.json records which).
HW_COMPAT_NONE, HW_COMPAT_SAME_CC = "NONE", "SAME_COMPUTE_CAPABILITY"


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
    if not 2 <= limits.max_context <= n_positions:
        raise BigCodeError(
            f"--max-context {limits.max_context} must be in 2..{n_positions} (a decode step needs one past token and "
            "one new one; the model's context is the most)"
        )
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


def parser_opsets(tensorrt_version: str) -> range:
    """The opsets TensorRT's ONNX parser of this version accepts ("10.13.0" -> 9..20). Raises BigCodeError for a
    version string that does not start with major.minor, or a major version older than 10."""
    match = re.match(r"(\d+)\.(\d+)", str(tensorrt_version))
    if match is None or int(match.group(1)) < 10:
        raise BigCodeError(f"TensorRT version {tensorrt_version!r} is not 10.x or newer: install TensorRT >= 10")
    version = (int(match.group(1)), int(match.group(2)))
    best = max(v for v in PARSER_MAX_OPSET if v <= version)
    return range(MIN_OPSET, PARSER_MAX_OPSET[best] + 1)


def check_opset(opset: int, tensorrt_version: str) -> None:
    """Raise BigCodeError (one line) when this TensorRT's parser cannot read a graph of this standard opset."""
    opsets = parser_opsets(tensorrt_version)
    if opset not in opsets:
        newer = [".".join(map(str, v)) for v, top in sorted(PARSER_MAX_OPSET.items()) if MIN_OPSET <= opset <= top]
        hint = f"install TensorRT >= {newer[0]} or " if newer else ""
        raise BigCodeError(
            f"the graph's opset {opset} is outside TensorRT {tensorrt_version}'s parser range "
            f"{opsets.start}-{opsets.stop - 1}: {hint}export with --opset {opsets.stop - 1}"
        )


def check_step(limits: dict[str, int], batch: int, sequence: int, past: int) -> None:
    """Check one step's shape against the engine's limits (engine.json) before TensorRT sees it.

    limits: EngineLimits as a dict; batch (rows), sequence (new tokens), past (cached tokens). Raises BigCodeError
    naming the limit and the build option that raises it.
    """
    problems = []
    if batch > limits["max_batch"]:
        problems.append(f"batch {batch} exceeds --max-batch {limits['max_batch']}")
    if past == 0 and sequence > limits["max_prompt"]:
        problems.append(f"a prompt of {sequence} tokens exceeds --max-prompt {limits['max_prompt']}")
    if past + sequence > limits["max_context"]:
        problems.append(f"a context of {past + sequence} tokens exceeds --max-context {limits['max_context']}")
    if past and sequence != 1:
        problems.append(f"a cached step of {sequence} tokens: the decode profile takes one new token per step")
    if problems:
        raise BigCodeError(
            f"the engine cannot run this step ({'; '.join(problems)}): rebuild it with larger limits "
            "(`bigcode-deploy build-engine`)"
        )


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


def gpu_model_slug(gpu_name: str) -> str:
    """A GPU model's name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def engine_dir(
    bundle_path: str | Path, compute_capability: tuple[int, int], trt_version: str, gpu_name: str | None = None
) -> Path:
    """bundle/engine/<gpu-arch>-<gpu model>-trt<version>/ for a default engine (promised on its GPU model only, so
    two models of one architecture keep a plan each), bundle/engine/<gpu-arch>-trt<version>/ when gpu_name is None
    (a SAME_COMPUTE_CAPABILITY engine, shared by every GPU of that architecture)."""
    model = f"-{gpu_model_slug(gpu_name)}" if gpu_name is not None else ""
    return Path(bundle_path) / ENGINE_DIR / f"{gpu_arch(compute_capability)}{model}-trt{trt_version}"


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
    hardware_compatibility: str = HW_COMPAT_NONE  # NONE: this GPU model only; SAME_COMPUTE_CAPABILITY: its arch

    @classmethod
    def read(cls, path: Path) -> EngineMetadata:
        """Raises BigCodeError (one line, with a rebuild hint) for a missing or malformed file."""
        try:
            meta = cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise BigCodeError(f"{path} is not a readable engine description ({exc}); rebuild the engine") from None
        limits = meta.limits if isinstance(meta.limits, dict) else {}
        if not all(type(limits.get(f.name)) is int for f in dataclasses.fields(EngineLimits)):
            raise BigCodeError(f"{path} records no integer limits ({meta.limits!r:.80}); rebuild the engine")
        return meta


def check_compatible(
    meta: EngineMetadata,
    tensorrt_version: str,
    compute_capability: tuple[int, int],
    graph_sha256: dict[str, str],
    gpu_name: str | None = None,
) -> None:
    """A plan runs only with the TensorRT version and GPU architecture it was built for, from the same graph; a
    default engine (hardware_compatibility NONE) is promised only on the GPU model it was built on, so gpu_name is
    compared too (skipped when None). Raises BigCodeError naming the mismatch."""
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
    if meta.hardware_compatibility not in (HW_COMPAT_NONE, HW_COMPAT_SAME_CC):
        raise BigCodeError(
            f"the engine records hardware compatibility {meta.hardware_compatibility!r}, which this runtime does not "
            "know: rebuild it with `bigcode-deploy build-engine`"
        )
    if gpu_name is not None and meta.hardware_compatibility == HW_COMPAT_NONE and meta.gpu_name != gpu_name:
        raise BigCodeError(
            f"the engine was built on {meta.gpu_name} and this GPU is {gpu_name}: TensorRT promises a default engine "
            "only on the GPU model it was built on; rebuild it here with `bigcode-deploy build-engine` (add "
            "--same-compute-capability for a plan that loads on any GPU of this compute capability)"
        )
    if meta.graph_sha256 != graph_sha256:
        raise BigCodeError(
            "the engine was built from another graph (graph sha256 differs from the manifest's): rebuild it with "
            "`bigcode-deploy build-engine`"
        )


def timing_cache_file(directory: str | Path, gpu_name: str, compute_capability: tuple[int, int], version: str) -> Path:
    """DIR/<gpu-arch>-<gpu model>-trt<version>.timing-cache: a timing cache holds tactic timings of one GPU model and
    one TensorRT version, so each gets its own file ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return Path(directory) / f"{gpu_arch(compute_capability)}-{gpu_model_slug(gpu_name)}-trt{version}.timing-cache"


# --- the guard --------------------------------------------------------------------------------------------------
@functools.cache
def trt_logger(trt: Any) -> Any:
    """One trt.Logger (WARNING) per process and tensorrt module, shared by the builder, the parser and every runtime,
    rather than a new one per object."""
    return trt.Logger(trt.Logger.WARNING)


def require_tensorrt() -> Any:
    """The tensorrt module, once tensorrt and cuda-python import and a CUDA device is visible.

    Raises BackendUnavailable with one line naming what is missing (checked in that order).
    """
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError/FileNotFoundError from a broken or stub wheel
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(
            f"TensorRT is not available: `import tensorrt` failed ({reason}); install the `tensorrt` extra on a "
            "machine with an NVIDIA GPU"
        ) from None
    from bigcode_deploy.runtime import cuda

    cuda.cudart()
    if cuda.device_count() == 0:
        raise BackendUnavailable(
            "TensorRT is installed but no CUDA device is visible (cudaGetDeviceCount failed or found none; check the "
            "driver, and that cuda-python's major version is not newer than the driver's CUDA)"
        )
    return trt
