"""The TensorRT backend: the runtime's backend contract (bigcode_deploy.runtime.backends) over a built engine.

Device memory, copies and the stream come from cuda-python (bigcode_deploy.runtime.cuda), never torch. Everything
the backend does (profile switches, uploads, execute_async_v3, the row gather of select_rows, downloads) goes on
ONE stream that it owns, so no cross-stream ordering is needed; the stream is synchronized at the end of each call
that hands buffers back, so dropped buffers can be freed at once. The KV cache stays on the device between steps as
DeviceBuffers. Loading refuses an engine built for another TensorRT, GPU architecture, GPU model (unless built with
SAME_COMPUTE_CAPABILITY) or graph, one whose I/O differs from the manifest, and one without the two profiles; each
step is checked against the engine's limits (engine.json) before TensorRT sees it. The engine is built by
bigcode_deploy.runtime.tensorrt_build (`build-engine`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.tensorrt_engine import (
    META_FILE,
    PLAN_FILE,
    PROFILE_NAMES,
    EngineMetadata,
    check_compatible,
    check_engine_io,
    check_step,
    engine_dir,
    input_shape_error,
    io_bindings,
    profile_for,
    require_tensorrt,
    trt_logger,
)


class TensorRTBackend:
    """Backend contract over a TensorRT engine (enter it with `with`; heavy set-up happens on enter).

    run(feeds) -> outputs: numpy in and out (float outputs as float32). empty_cache(batch) / step(...) /
    select_rows(cache, rows): the cache is a list of cuda.DeviceBuffer (one per layer, batch-major).
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int = 0):
        self.bundle = bundle
        self.context = None

    # --- set-up -----------------------------------------------------------------------------------------------
    def __enter__(self) -> TensorRTBackend:
        """Load the plan for this GPU and TensorRT. Raises BackendUnavailable (one line) without TensorRT,
        cuda-python or a device; BigCodeError for a missing, incompatible or unloadable engine (rebuild hint)."""
        trt = require_tensorrt()
        from bigcode_deploy.runtime import cuda

        gpu_name, capability = cuda.device_info()
        # This GPU model's own plan first, then one built for any GPU of this compute capability.
        candidates = [engine_dir(self.bundle.path, capability, trt.__version__, gpu_name)]
        candidates.append(engine_dir(self.bundle.path, capability, trt.__version__))
        directory = next((d for d in candidates if (d / PLAN_FILE).is_file()), candidates[0])
        plan = directory / PLAN_FILE
        rebuild = f"rebuild it with `bigcode-deploy build-engine {self.bundle.path}` here"
        if not plan.is_file():
            raise BigCodeError(f"no engine for this GPU and TensorRT at {candidates[0]} or {candidates[1]}: {rebuild}")
        self.meta = EngineMetadata.read(directory / META_FILE)
        check_compatible(self.meta, trt.__version__, capability, self.bundle.manifest.graph.sha256, gpu_name)
        self.cuda = cuda
        self.runtime = trt.Runtime(trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BigCodeError(f"TensorRT could not deserialize {plan} (see its log above): {rebuild}")
        check_engine_io(engine_io(self.engine, trt), self.bundle.manifest, what=f"the engine {plan}")
        profiles = self.engine.num_optimization_profiles
        if profiles != len(PROFILE_NAMES):
            raise BigCodeError(
                f"the engine {plan} has {profiles} optimization profiles where {len(PROFILE_NAMES)} (prefill, decode) "
                f"are needed: {rebuild}"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BigCodeError(f"TensorRT could not create an execution context for {plan} (see its log): {rebuild}")
        self.bindings = {b.name: b for b in io_bindings(self.bundle.manifest)}
        self.stream = cuda.Stream()
        names = list(self.bindings)
        try:
            # Zero-size tensors (the empty past) still need a real address, a distinct one each: one aligned block.
            self.dummy = cuda.DeviceBuffer((len(names) * cuda.ALIGNMENT,), np.uint8)
        except BaseException:
            self.__exit__(None, None, None)  # __exit__ does not run when __enter__ raises: free the stream here
            raise
        self.dummies = cuda.dummy_addresses(self.dummy.ptr, names)
        self.profile: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        """Free the device memory and the stream; drop the context before the engine before the runtime."""
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
            self.stream = None
        dummy = getattr(self, "dummy", None)
        if dummy is not None:
            dummy.close()
            self.dummy = None
        self.context = None
        self.engine = None
        self.runtime = None

    # --- the contract -----------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named host arrays in (the graph's inputs), named host arrays out (float outputs as float32)."""
        inputs = {name: self._upload(name, array) for name, array in feeds.items()}
        outputs = self._execute(inputs)
        result = {}
        for name, buffer in outputs.items():
            host = self.cuda.to_host(buffer, self.stream)
            result[name] = host if self.bindings[name].trt_dtype == "INT64" else host.astype(np.float32)
            buffer.close()
        return result

    def empty_cache(self, batch: int) -> list[Any]:
        """The first step's past: one zero-size DeviceBuffer (past_sequence = 0) per layer."""
        shape = self.bundle.empty_past_shape(batch)
        return [self.cuda.DeviceBuffer(shape, self.bindings[name].dtype) for name in self.bundle.past_names()]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[Any]):
        """One decoding step. input_ids, position_ids (B, T) and attention_mask (B, P + T) int64 host arrays;
        cache: the previous step's presents (B, [H,] P, 2 * head_dim) on the device. Returns the logits of each
        row's last position (B, vocab) float32 numpy, and the presents (B, [H,] P + T, 2 * head_dim) as the new
        cache."""
        inputs = {
            "input_ids": self._upload("input_ids", input_ids),
            "attention_mask": self._upload("attention_mask", attention_mask),
        }
        if "position_ids" in self.bindings:
            inputs["position_ids"] = self._upload("position_ids", position_ids)
        inputs.update(zip(self.bundle.past_names(), cache))
        outputs = self._execute(inputs)
        logits = outputs.pop(self.bundle.manifest.main_output)
        last = self.cuda.last_position_to_host(logits, self.stream).astype(np.float32)
        logits.close()
        return last, [outputs[name] for name in self.bundle.present_names()]

    def select_rows(self, cache: list[Any], rows: np.ndarray) -> list[Any]:
        """Keep only these batch rows of every cache buffer (device-to-device, on the backend's stream)."""
        kept = [self.cuda.gather_rows(buffer, rows, self.stream) for buffer in cache]
        self.stream.synchronize()  # the caller may drop (free) the old buffers now
        return kept

    # --- internals --------------------------------------------------------------------------------------------
    def _upload(self, name: str, array: np.ndarray) -> Any:
        binding = self.bindings.get(name)
        if binding is None or binding.mode != "input":
            raise BigCodeError(f"{name} is not an input of this engine (inputs: {', '.join(self.bundle.input_names)})")
        return self.cuda.to_device(array, self.stream, dtype=binding.dtype)

    def _execute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """inputs: DeviceBuffers by name -> output DeviceBuffers by name (the stream is synchronized on return).
        Raises BigCodeError for a shape outside the engine's profiles or a failed execution."""
        past_names = self.bundle.past_names()
        axis = self.bundle.kv_cache.sequence_axis if self.bundle.kv_cache else 0
        past_length = inputs[past_names[0]].shape[axis] if past_names else 0
        batch, sequence = inputs["input_ids"].shape
        check_step(self.meta.limits, batch, sequence, past_length)
        wanted = profile_for(past_length)
        if wanted != self.profile:
            # On the same stream as the execution that follows, so no extra synchronization is needed.
            try:
                switched = self.context.set_optimization_profile_async(wanted, self.stream.handle)
            except RuntimeError as exc:  # the Python binding raises where the C++ API returns false
                switched, reason = False, f" ({exc})"
            else:
                reason = ""
            if not switched:
                raise BigCodeError(f"TensorRT could not switch to optimization profile {wanted}{reason}")
            self.profile = wanted
        for name, buffer in inputs.items():
            if not self.context.set_input_shape(name, buffer.shape):
                raise BigCodeError(input_shape_error(name, buffer.shape, wanted, self.meta.profiles))
            self._bind(name, buffer.ptr if buffer.nbytes else self.dummies[name])
        outputs = {}
        for name in self.bundle.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BigCodeError(f"TensorRT could not infer the shape of output {name} ({shape}) from the inputs")
            outputs[name] = self.cuda.DeviceBuffer(shape, self.bindings[name].dtype)
            self._bind(name, outputs[name].ptr or self.dummies[name])
        if not self.context.execute_async_v3(self.stream.handle):
            raise BigCodeError("TensorRT execute_async_v3 failed (see its log above)")
        self.stream.synchronize()
        return outputs

    def _bind(self, name: str, address: int) -> None:
        """Bind a contiguous buffer's address (DeviceBuffers are C-order by construction; cudaMalloc's and the
        dummies are ALIGNMENT-aligned, which setTensorAddress requires). Raises BigCodeError otherwise."""
        if address % self.cuda.ALIGNMENT:
            raise BigCodeError(f"the address {address:#x} of tensor {name} is not {self.cuda.ALIGNMENT}-byte aligned")
        if not self.context.set_tensor_address(name, address):
            raise BigCodeError(f"TensorRT refused the address of tensor {name}")


def engine_io(engine: Any, trt: Any) -> dict[str, tuple[str, str]]:
    """{name: (mode "input"/"output", TensorRT dtype name)} of a deserialized ICudaEngine's I/O tensors."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        io[name] = (mode, engine.get_tensor_dtype(name).name)
    return io
