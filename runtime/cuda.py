"""CUDA device memory, copies and one stream, through NVIDIA's cuda-python (no torch, no pycuda).

What the TensorRT backend needs and nothing more: device buffers (pointer, shape, numpy dtype, bytes; freed on
close), host<->device copies on a stream, stream synchronization, the device's name and compute capability, and a
device-to-device gather of batch rows (the KV cache is batch-major and contiguous, so one kept row is one
contiguous byte range, and a run of consecutive kept rows is one copy).

Every cudart call returns an error tuple `(cudaError_t, *values)`; `call` checks it and raises CudaError naming the
call. Importing this module needs nothing: cuda-python is imported on first use (`cudart()`), and its absence is a
one-line BackendUnavailable. The copy plans (`row_gather_plan`, `last_position_layout`) are pure and tested on the
CPU; everything else needs a CUDA device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigcode_deploy.runtime.errors import BackendUnavailable, BigCodeError

# Device addresses handed to TensorRT must be 256-byte aligned (IExecutionContext::setTensorAddress); cudaMalloc's
# are, and the dummy addresses of zero-size tensors are spaced by this.
ALIGNMENT = 256


class CudaError(BigCodeError):
    """A CUDA runtime call that failed: the message names the call, the error name and CUDA's description."""


@functools.cache
def cudart() -> Any:
    """The cuda-python runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6.1), else the older
    `cuda.cudart` (removed in 13). Raises BackendUnavailable in one line when neither imports."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6.1
        except ImportError as exc:
            raise BackendUnavailable(
                f"CUDA is not available to the runtime: `from cuda.bindings import runtime` failed ({exc}); install "
                "the `tensorrt` extra (cuda-python) on a machine with an NVIDIA GPU"
            ) from None
    return runtime


def call(name: str, result: Any) -> Any:
    """Check a cudart result tuple `(err, *values)`. Returns None, the one value, or the tuple of values.

    Raises CudaError "cudaMalloc failed: cudaErrorMemoryAllocation (out of memory)" style, naming the call.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # cudaSuccess
        rt = cudart()
        error_name = _text(rt.cudaGetErrorName(err)) or str(err)
        description = _text(rt.cudaGetErrorString(err))
        raise CudaError(f"{name} failed: {error_name}" + (f" ({description})" if description else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _text(result: Any) -> str:
    """cudaGetErrorName/String return (cudaError_t, bytes); '' when that lookup itself fails."""
    try:
        err, value = result
        return value.decode(errors="replace") if int(err) == 0 and value else ""
    except (TypeError, ValueError):
        return ""


def native_handle(obj: Any) -> int:
    """The address of a cuda-python object (a cudaStream_t) as an int, for TensorRT's stream_handle."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9.1 (int(obj) is deprecated)
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def device_count() -> int:
    """Visible CUDA devices; 0 when the driver is missing or too old for this cuda-python (not an error here)."""
    err, *values = cudart().cudaGetDeviceCount()
    return int(values[0]) if int(err) == 0 else 0


def device_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor) compute capability) of a device, from cudaGetDeviceProperties. Raises CudaError."""
    props = call("cudaGetDeviceProperties", cudart().cudaGetDeviceProperties(device))
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return name.strip(), (int(props.major), int(props.minor))


class Stream:
    """A non-blocking CUDA stream owned by its creator; every copy and execution of one backend goes on it."""

    def __init__(self) -> None:
        rt = cudart()
        self._stream = call("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def raw(self) -> Any:
        """The cudaStream_t, for cudart calls."""
        return self._stream

    @property
    def handle(self) -> int:
        """The stream's address, for TensorRT (execute_async_v3, set_optimization_profile_async)."""
        return native_handle(self._stream)

    def synchronize(self) -> None:
        """Wait for all work queued on the stream. Raises CudaError (also for an earlier asynchronous failure)."""
        call("cudaStreamSynchronize", cudart().cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        """Synchronize and destroy the stream (idempotent)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            call("cudaStreamSynchronize", cudart().cudaStreamSynchronize(stream))
            call("cudaStreamDestroy", cudart().cudaStreamDestroy(stream))

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceBuffer:
    """A contiguous (C-order) device array: ptr (int, 0 for zero-size), shape, dtype (numpy), nbytes.

    Owns its memory: close() frees it (also on garbage collection, so a dropped KV cache is released). Freeing
    while work that uses the buffer is queued is the caller's concern: the backend synchronizes its one stream
    before buffers can be dropped.
    """

    def __init__(self, shape: tuple[int, ...] | list[int], dtype: Any) -> None:
        self.ptr = 0
        self.source: np.ndarray | None = None  # the host array an upload reads from, kept alive with the buffer
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        if any(d < 0 for d in self.shape):
            raise BigCodeError(f"cannot allocate a device buffer of shape {self.shape} (negative dimension)")
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.ptr = int(call("cudaMalloc", cudart().cudaMalloc(self.nbytes))) if self.nbytes else 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one batch row (axis 0); 0 for a 0-d buffer."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def close(self) -> None:
        """Free the device memory (idempotent). Raises CudaError if cudaFree fails."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            call("cudaFree", cudart().cudaFree(ptr))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may already be gone
            pass

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceBuffer(shape={self.shape}, dtype={self.dtype}, nbytes={self.nbytes}, ptr={self.ptr:#x})"


def to_device(array: np.ndarray, stream: Stream, dtype: Any = None) -> DeviceBuffer:
    """Copy a host array to a new device buffer, asynchronously on `stream` (as `dtype` when given).

    The host array is made contiguous (and converted) first and kept alive with the buffer, so the asynchronous
    copy never reads freed memory. Raises CudaError.
    """
    host = np.ascontiguousarray(array, dtype=dtype)
    buffer = DeviceBuffer(host.shape, host.dtype)
    buffer.source = host  # the copy may still read it: it lives as long as the buffer
    if buffer.nbytes:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        call("cudaMemcpyAsync", rt.cudaMemcpyAsync(buffer.ptr, host.ctypes.data, buffer.nbytes, kind, stream.raw))
    return buffer


def to_host(buffer: DeviceBuffer, stream: Stream) -> np.ndarray:
    """The buffer's contents as a new host array of its shape and dtype; synchronizes `stream`. Raises CudaError."""
    host = np.empty(buffer.shape, dtype=buffer.dtype)
    if buffer.nbytes:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call("cudaMemcpyAsync", rt.cudaMemcpyAsync(host.ctypes.data, buffer.ptr, buffer.nbytes, kind, stream.raw))
        stream.synchronize()
    return host


@dataclass(frozen=True)
class Layout2D:
    """A strided copy: `height` rows of `width` bytes, starting `offset` bytes into the source, `pitch` apart."""

    offset: int
    pitch: int
    width: int
    height: int


def last_position_layout(shape: tuple[int, ...], itemsize: int) -> Layout2D:
    """Where each row's last position lies in a contiguous (B, T, V) array: B rows of V * itemsize bytes,
    starting at (T - 1) * V * itemsize, T * V * itemsize bytes apart. Raises BigCodeError for another rank."""
    if len(shape) != 3:
        raise BigCodeError(f"last-position copy needs a (batch, sequence, vocab) tensor, got shape {tuple(shape)}")
    b, t, v = shape
    width = v * itemsize
    return Layout2D(offset=max(t - 1, 0) * width, pitch=t * width, width=width, height=b if t else 0)


def last_position_to_host(buffer: DeviceBuffer, stream: Stream) -> np.ndarray:
    """(B, T, V) device logits -> (B, V) host array of each row's last position (one cudaMemcpy2DAsync, only
    those bytes cross the bus); synchronizes `stream`. Raises CudaError or BigCodeError for another rank."""
    layout = last_position_layout(buffer.shape, buffer.dtype.itemsize)
    host = np.empty((buffer.shape[0], buffer.shape[2]), dtype=buffer.dtype)
    if layout.width and layout.height:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = rt.cudaMemcpy2DAsync(
            host.ctypes.data,
            layout.width,
            buffer.ptr + layout.offset,
            layout.pitch,
            layout.width,
            layout.height,
            kind,
            stream.raw,
        )
        call("cudaMemcpy2DAsync", result)
        stream.synchronize()
    return host


@dataclass(frozen=True)
class Copy:
    """One contiguous copy: `nbytes` bytes from byte `src` of the source to byte `dst` of the destination."""

    src: int
    dst: int
    nbytes: int


def row_gather_plan(rows: list[int] | np.ndarray, batch: int, row_bytes: int) -> list[Copy]:
    """The copies that gather batch `rows` (in this order) of a contiguous batch-major array into a new one.

    Row r occupies bytes [r * row_bytes, (r + 1) * row_bytes); consecutive ascending rows merge into one copy.
    rows: ints in [0, batch), duplicates allowed. Returns [] when row_bytes is 0 (an empty cache). Raises
    BigCodeError for a row outside the batch.
    """
    rows = [int(r) for r in np.asarray(rows, dtype=np.int64).reshape(-1)]
    bad = [r for r in rows if not 0 <= r < batch]
    if bad:
        raise BigCodeError(f"rows {bad} are outside the batch (0..{batch - 1})")
    if not row_bytes:
        return []
    plan: list[Copy] = []
    for out, r in enumerate(rows):
        last = plan[-1] if plan else None
        if last is not None and last.src + last.nbytes == r * row_bytes and last.dst + last.nbytes == out * row_bytes:
            plan[-1] = Copy(last.src, last.dst, last.nbytes + row_bytes)
        else:
            plan.append(Copy(r * row_bytes, out * row_bytes, row_bytes))
    return plan


def gather_rows(buffer: DeviceBuffer, rows: list[int] | np.ndarray, stream: Stream) -> DeviceBuffer:
    """A new buffer (len(rows), *shape[1:]) holding the given batch rows, copied device-to-device on `stream`
    (asynchronously: synchronize before freeing `buffer`). Raises BigCodeError for a bad row, CudaError."""
    if not buffer.shape:
        raise BigCodeError("cannot select rows of a 0-d buffer")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    plan = row_gather_plan(rows, buffer.shape[0], buffer.row_bytes)
    out = DeviceBuffer((len(rows), *buffer.shape[1:]), buffer.dtype)
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    for copy in plan:
        result = rt.cudaMemcpyAsync(out.ptr + copy.dst, buffer.ptr + copy.src, copy.nbytes, kind, stream.raw)
        call("cudaMemcpyAsync", result)
    return out


def dummy_addresses(base: int, names: list[str]) -> dict[str, int]:
    """A distinct, non-null, 256-byte-aligned address for each name, inside one block of len(names) * ALIGNMENT
    bytes at `base` (for zero-size tensors, which TensorRT still wants bound to a real address)."""
    if base == 0 and names:
        raise BigCodeError("dummy addresses need a non-null base")
    return {name: base + i * ALIGNMENT for i, name in enumerate(names)}
