"""TensorRT: engine build (`bigcode-deploy build-engine`) and the TensorRT backend, in one module.

Written from the TensorRT 10.x/11.x Python API (shared/notes/tensorrt.md): strongly typed networks (precision
from the graph's dtypes), build_serialized_network, memory-pool limits, the tensor-name I/O API and
execute_async_v3; device buffers and the stream come from torch.cuda, so no pycuda is needed. TensorRT cannot
be installed on the machines this project is developed and tested on: the pure parts (profiles, engine
metadata and its compatibility check, engine paths, the I/O mapping) are tested on the CPU; everything that
imports tensorrt is guarded by `require_tensorrt()`, which names what is missing in one line.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import BigCodeError
from exporter.progress import Progress, print_progress, step
from runtime.backends import BackendUnavailable
from runtime.bundle import Bundle, numpy_to_torch

PLAN_FILE, META_FILE = "model.plan", "engine.json"
# Manifest dtype -> TensorRT DataType member name, and the torch dtype of the buffer bound to it.
TRT_DTYPES = {"int64": "INT64", "float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}
TORCH_DTYPES = {"int64": "int64", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
PREFILL, DECODE = 0, 1  # optimization profile indices


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: tested on the CPU.

@dataclass(frozen=True)
class EngineLimits:
    max_batch: int
    max_prompt: int
    max_context: int


def engine_limits(manifest: dict[str, Any], max_batch: int | None, max_prompt: int | None,
                  max_context: int | None) -> EngineLimits:
    """The options checked against the manifest's dims (defaults: the manifest's own ranges)."""
    dims = manifest["dims"]
    n_positions = manifest["config"]["n_positions"]
    batch_max = dims["batch"]["max"]
    limits = EngineLimits(
        max_batch=max_batch or batch_max or 8,
        max_context=max_context or n_positions,
        max_prompt=max_prompt or min(n_positions, max_context or n_positions) // 2,
    )
    if batch_max is not None and limits.max_batch > batch_max:
        raise BigCodeError(f"--max-batch {limits.max_batch} exceeds the bundle's batch range (max {batch_max})")
    if not 1 <= limits.max_context <= n_positions:
        raise BigCodeError(f"--max-context {limits.max_context} must be in 1..{n_positions} (the model's context)")
    if not 1 <= limits.max_prompt <= limits.max_context:
        raise BigCodeError(f"--max-prompt {limits.max_prompt} must be in 1..--max-context ({limits.max_context})")
    if manifest.get("kv_cache") is None:
        raise BigCodeError("build-engine needs a causal-lm bundle with a KV cache (exported without --no-cache)")
    return limits


def _shape(spec: list, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in spec)


def derive_profiles(manifest: dict[str, Any], limits: EngineLimits) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """Two optimization profiles, each {input name: (min, opt, max) shape}.

    prefill: past_sequence 0 and sequence 1..max_prompt; decode: sequence 1 and past_sequence 1..max_context-1.
    The symbolic dims of the manifest's input shapes are filled from these ranges.
    """
    b = limits.max_batch
    ranges = {
        PREFILL: {"batch": (1, max(1, b // 2), b), "sequence": (1, max(1, limits.max_prompt // 2), limits.max_prompt),
                  "past_sequence": (0, 0, 0)},
        DECODE: {"batch": (1, max(1, b // 2), b), "sequence": (1, 1, 1),
                 "past_sequence": (1, max(1, limits.max_context // 2), limits.max_context - 1)},
    }
    profiles = []
    for index in (PREFILL, DECODE):
        r = ranges[index]
        point = [{name: r[name][i] for name in r} for i in range(3)]
        for p in point:
            p["past_sequence + sequence"] = p["past_sequence"] + p["sequence"]
        profiles.append({i["name"]: tuple(_shape(i["shape"], point[k]) for k in range(3)) for i in manifest["inputs"]})
    return profiles


def profile_for(past_length: int) -> int:
    return PREFILL if past_length == 0 else DECODE


def io_bindings(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """Manifest I/O -> TensorRT tensor names (the graph's own), TensorRT dtypes and torch buffer dtypes."""
    out = []
    for mode, values in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
        for v in values:
            if v["dtype"] not in TRT_DTYPES:
                raise BigCodeError(f"{mode} {v['name']} has dtype {v['dtype']}, which has no TensorRT binding here")
            out.append({"name": v["name"], "mode": mode, "trt_dtype": TRT_DTYPES[v["dtype"]],
                        "torch_dtype": TORCH_DTYPES[v["dtype"]]})
    return out


def gpu_arch(compute_capability: tuple[int, int]) -> str:
    return f"sm{compute_capability[0]}{compute_capability[1]}"


def engine_dir(bundle_path: str | Path, compute_capability: tuple[int, int], trt_version: str) -> Path:
    """bundle/engine/<gpu-arch>-trt<version>/: one plan per GPU architecture and TensorRT version."""
    return Path(bundle_path) / "engine" / f"{gpu_arch(compute_capability)}-trt{trt_version}"


@dataclass
class EngineMetadata:
    tensorrt_version: str
    gpu_name: str
    compute_capability: list[int]
    graph_sha256: dict[str, str]
    profiles: list[dict[str, list]]
    limits: dict[str, int]
    build_seconds: float

    @classmethod
    def read(cls, path: Path) -> "EngineMetadata":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise BigCodeError(f"{path} is not a readable engine description ({exc}); rebuild the engine") from None


def check_compatible(meta: EngineMetadata, tensorrt_version: str, compute_capability: tuple[int, int],
                     graph_sha256: dict[str, str]) -> None:
    """A plan runs only with the TensorRT version and GPU architecture it was built for, from the same graph."""
    if meta.tensorrt_version != tensorrt_version:
        raise BigCodeError(f"the engine was built with TensorRT {meta.tensorrt_version}, this is TensorRT "
                           f"{tensorrt_version}: rebuild it with `bigcode-deploy build-engine`")
    if tuple(meta.compute_capability) != tuple(compute_capability):
        raise BigCodeError(f"the engine was built for GPU architecture {gpu_arch(tuple(meta.compute_capability))} "
                           f"({meta.gpu_name}), this GPU is {gpu_arch(compute_capability)}: rebuild it here")
    if meta.graph_sha256 != graph_sha256:
        raise BigCodeError("the engine was built from another graph (graph sha256 differs from the manifest's): "
                           "rebuild it with `bigcode-deploy build-engine`")


# ---------------------------------------------------------------------------------------------------------------
# Parts that need TensorRT and a CUDA device.

def require_tensorrt():
    """The tensorrt module, or one clear line naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not available: `import tensorrt` failed ({exc}); install the `tensorrt` extra on a machine "
            "with an NVIDIA GPU"
        ) from None
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("TensorRT needs torch with CUDA for device buffers; torch is not installed") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT is installed but no CUDA device is visible (torch.cuda.is_available() is False)")
    return trt


def _device() -> tuple[str, tuple[int, int]]:
    import torch

    return torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def _progress_monitor(trt, progress: Progress):
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                progress(f"  tensorrt: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(
    bundle_path: str | Path, *, max_batch: int | None = None, max_prompt: int | None = None,
    max_context: int | None = None, timing_cache: str | Path | None = None, workspace_gb: float = 4.0,
    progress: Progress = print_progress,
) -> Path:
    """Build the plan for a tensorrt-target bundle (a portable one is lowered first, beside it)."""
    trt = require_tensorrt()
    bundle = Bundle.open(bundle_path)
    if bundle.manifest["target"] != "tensorrt":
        from graphs.optimize import optimize_bundle

        lowered = Path(str(bundle.path).rstrip("/") + "-tensorrt")
        dtype = bundle.manifest["dtype"] if bundle.manifest["dtype"] != "fp32" else "fp16"
        progress(f"{bundle.path} targets {bundle.manifest['target']}: lowering it to {lowered} ({dtype}) first")
        optimize_bundle(bundle.path, lowered, target="tensorrt", dtype=dtype, force=True, progress=progress)
        bundle = Bundle.open(lowered)
    manifest = bundle.manifest
    limits = engine_limits(manifest, max_batch, max_prompt, max_context)
    profiles = derive_profiles(manifest, limits)
    gpu_name, capability = _device()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with step(progress, f"parsing {bundle.graph_path}"):
        if not parser.parse_from_file(str(bundle.graph_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BigCodeError(f"TensorRT's ONNX parser rejected {bundle.graph_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    with step(progress, f"building the engine for {gpu_name} (TensorRT {trt.__version__})"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BigCodeError("TensorRT failed to build the engine (see its log above)")
    out = engine_dir(bundle.path, capability, trt.__version__)
    out.mkdir(parents=True, exist_ok=True)
    meta = EngineMetadata(
        tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=list(capability),
        graph_sha256=manifest["graph"]["sha256"],
        profiles=[{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        limits=asdict(limits), build_seconds=round(time.perf_counter() - start, 1),
    )
    for name, data in ((PLAN_FILE, bytes(plan)), (META_FILE, (json.dumps(asdict(meta), indent=2) + "\n").encode())):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(out / name)
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    progress(f"wrote {out / PLAN_FILE}")
    return out / PLAN_FILE


class TensorRTBackend:
    """The runtime's backend contract over a TensorRT engine; the KV cache stays on the device between steps."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int = 0):
        self.bundle = bundle
        self.context = None

    def __enter__(self) -> "TensorRTBackend":
        import torch

        trt = require_tensorrt()
        gpu_name, capability = _device()
        directory = engine_dir(self.bundle.path, capability, trt.__version__)
        if not (directory / PLAN_FILE).is_file():
            raise BigCodeError(f"no engine for this GPU and TensorRT at {directory}: run `bigcode-deploy build-engine "
                               f"{self.bundle.path}` here first")
        meta = EngineMetadata.read(directory / META_FILE)
        check_compatible(meta, trt.__version__, capability, self.bundle.manifest["graph"]["sha256"])
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((directory / PLAN_FILE).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.profile = None
        self.bindings = {b["name"]: b for b in io_bindings(self.bundle.manifest)}
        self.dummy = torch.empty(1, device="cuda")  # an address for zero-size tensors (the empty past)
        return self

    def __exit__(self, *exc) -> None:
        self.context = None
        self.engine = None

    def _execute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """inputs: torch CUDA tensors by name. Returns output CUDA tensors by name."""
        import torch

        past_names = self.bundle.past_names()
        past_length = inputs[past_names[0]].shape[-2] if past_names else 0
        wanted = profile_for(past_length)
        if wanted != self.profile:
            self.context.set_optimization_profile_async(wanted, self.stream.cuda_stream)
            self.profile = wanted
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self.dummy.data_ptr())
        outputs = {}
        for name in self.bundle.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = getattr(torch, self.bindings[name]["torch_dtype"])
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BigCodeError("TensorRT execute_async_v3 failed (see its log above)")
        self.stream.synchronize()
        return outputs

    def _to_device(self, name: str, array: np.ndarray):
        import torch

        dtype = getattr(torch, self.bindings[name]["torch_dtype"])
        return numpy_to_torch(array).to(device="cuda", dtype=dtype)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._execute({name: self._to_device(name, a) for name, a in feeds.items()})
        return {name: t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for name, t in outputs.items()}

    def empty_cache(self, batch: int):
        import torch

        shape = self.bundle.empty_past_shape(batch)
        dtype = getattr(torch, TORCH_DTYPES[self.bundle.kv_cache["dtype"]])
        return [torch.empty(shape, dtype=dtype, device="cuda") for _ in self.bundle.past_names()]

    def step(self, input_ids, attention_mask, position_ids, cache):
        inputs = {"input_ids": self._to_device("input_ids", input_ids),
                  "attention_mask": self._to_device("attention_mask", attention_mask),
                  "position_ids": self._to_device("position_ids", position_ids),
                  **dict(zip(self.bundle.past_names(), cache))}
        outputs = self._execute(inputs)
        logits = outputs["logits"][:, -1].float().cpu().numpy()
        return logits, [outputs[name] for name in self.bundle.present_names()]

    def select_rows(self, cache, rows: np.ndarray):
        import torch

        index = torch.as_tensor(rows, dtype=torch.long, device="cuda")
        return [t.index_select(0, index) for t in cache]
