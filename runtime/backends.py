"""Backends behind one small contract, used as context managers (heavy set-up happens on enter).

- `run(feeds)`: named numpy arrays in, named numpy arrays out (the graph's own I/O names).
- `empty_cache(batch)`, `step(input_ids, attention_mask, position_ids, cache)`: one decoding step that keeps the
  KV cache in the backend's native form between steps (OrtValues for ONNX Runtime, tensors for torch), so the
  present of step n becomes the past of step n+1 without a round trip through numpy. Returns the logits of each
  row's last position (B, vocab) as float32 numpy, and the new cache.
- `select_rows(cache, rows)`: keep only these batch rows (finished rows stop consuming work).

The TensorRT backend (its own issue) plugs into the same contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BackendUnavailable, BigCodeError, BundleError
from bigcode_deploy.runtime.manifest import BACKENDS

ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "bfloat16": "tensor(bfloat16)",
    "int64": "tensor(int64)",
}
MAX_THREADS = 1024  # intra-op threads a caller may ask for
Cache = Any  # backend-native: list of OrtValue, or list of torch.Tensor


class OrtBackend:
    """ONNX Runtime: CPU provider here; CUDA when onnxruntime-gpu and a GPU are present (provider='cuda')."""

    name = "ort"

    def __init__(self, bundle: Bundle, threads: int = 0, provider: str = "cpu"):
        self.bundle = bundle
        self.threads = threads
        self.provider = provider
        self.session = None

    def __enter__(self) -> OrtBackend:
        import onnxruntime as ort

        if self.bundle.manifest.dtype == "bf16" and self.provider == "cpu":
            raise BackendUnavailable(
                "ONNX Runtime's CPU provider has no bf16 kernels: run this bundle with --backend tensorrt or on CUDA, "
                "or export fp16/fp32"
            )
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[
            self.provider
        ]
        if self.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "ONNX Runtime's CUDA provider is not available: install onnxruntime-gpu on a GPU machine"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        # ONNX Runtime loads the bytes that were hashed (never the files again), and external data only from the
        # manifest's data file (every tensor's location was checked against it when the bundle was opened). A data
        # file above IN_MEMORY_DATA_LIMIT is read by ONNX Runtime from the bundle directory and hashed again after.
        model_bytes, external = self.bundle.graph_buffers()
        from_directory = self.bundle.manifest.graph.external_data is not None and not external
        if external:
            options.add_external_initializers_from_files_in_memory(
                list(external), list(external.values()), [len(b) for b in external.values()]
            )
        elif from_directory:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.bundle.path.resolve())
            )
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own types (InvalidProtobuf, Fail, ...) for a bad graph
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise BundleError(
                f"ONNX Runtime cannot load {self.bundle.graph_path}: {first}; re-export the bundle"
            ) from None
        finally:
            del model_bytes, external  # ONNX Runtime holds its own copy now
        if from_directory:
            self.bundle.check_external_data_unchanged()
        self._check_io()
        self._device = "cuda" if self.provider == "cuda" else "cpu"
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    def _check_io(self) -> None:
        """The graph's own I/O against the manifest: names in order, element types, ranks and static dims. A
        manifest that does not describe its graph is refused here rather than misread later."""
        manifest = self.bundle.manifest
        for kind, found, expected in (
            ("inputs", self.session.get_inputs(), manifest.inputs),
            ("outputs", self.session.get_outputs(), manifest.outputs),
        ):
            if [f.name for f in found] != [e.name for e in expected]:
                raise BundleError(f"{self.bundle.graph_path}'s {kind} are not the ones manifest.json names")
            for f, e in zip(found, expected):
                static = [(a, b) for a, b in zip(f.shape, e.shape) if isinstance(a, int) and isinstance(b, int)]
                if f.type != ORT_TYPES.get(e.dtype) or len(f.shape) != len(e.shape) or any(a != b for a, b in static):
                    raise BundleError(
                        f"{self.bundle.graph_path}: {f.name} is {f.type} {f.shape} where manifest.json says "
                        f"{e.dtype} {e.shape}; re-export the bundle"
                    )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.bundle.output_names
        return dict(zip(names, self.session.run(names, feeds)))

    def empty_cache(self, batch: int) -> Cache:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(a, self._device) for a in self.bundle.empty_past(batch).values()]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache):
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if "position_ids" in self.bundle.input_names:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.bundle.past_names(), cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.bundle.present_names():
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1].astype(np.float32)  # (B, vocab)
        return logits, list(outputs[1:])

    def select_rows(self, cache: Cache, rows: np.ndarray) -> Cache:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]), self._device) for v in cache]


def open_backend(bundle: Bundle, backend: str = "ort", *, threads: int = 0):
    """The backend object for a bundle (enter it with `with` to set it up): ort, ort-cuda or tensorrt.

    The torch reference backend lives in bigcode_deploy.exporter (it needs torch and the checkpoint);
    bigcode_deploy.workflows.backends.open_any_backend offers all four. Raises BigCodeError for another name.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= MAX_THREADS:
        raise BigCodeError(f"threads {str(threads)[:40]!r} must be an integer in [0, {MAX_THREADS}] (0: the default)")
    if backend == "ort":
        return OrtBackend(bundle, threads=threads)
    if backend == "ort-cuda":
        return OrtBackend(bundle, threads=threads, provider="cuda")
    if backend == "torch":
        raise BackendUnavailable(
            "the torch reference backend is not part of the runtime: use bigcode-deploy's CLI or "
            "bigcode_deploy.workflows.backends.open_any_backend (needs torch and the checkpoint)"
        )
    if backend == "tensorrt":
        from bigcode_deploy.runtime.tensorrt import TensorRTBackend  # imports tensorrt only when entered

        return TensorRTBackend(bundle, threads=threads)
    raise BigCodeError(f"unknown backend {str(backend)[:40]!r}; choose one of {', '.join(BACKENDS)}")
