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

from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import BigCodeError
from runtime.bundle import Bundle, numpy_to_torch

Cache = Any  # backend-native: list of OrtValue, or list of torch.Tensor


class BackendUnavailable(BigCodeError):
    """A backend whose library or device is missing here."""


class OrtBackend:
    """ONNX Runtime: CPU provider here; CUDA when onnxruntime-gpu and a GPU are present (provider='cuda')."""

    name = "ort"

    def __init__(self, bundle: Bundle, threads: int = 0, provider: str = "cpu"):
        self.bundle = bundle
        self.threads = threads
        self.provider = provider
        self.session = None

    def __enter__(self) -> "OrtBackend":
        import onnxruntime as ort

        if self.bundle.manifest["dtype"] == "bf16" and self.provider == "cpu":
            raise BackendUnavailable(
                "ONNX Runtime's CPU provider has no bf16 kernels: run this bundle with --backend tensorrt or on CUDA, "
                "or export fp16/fp32"
            )
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}[self.provider]
        if self.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("ONNX Runtime's CUDA provider is not available: install onnxruntime-gpu on a GPU machine")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.bundle.graph_path), options, providers=providers)
        self._device = "cuda" if self.provider == "cuda" else "cpu"
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

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


class TorchBackend:
    """The torch reference model, loaded from the checkpoint the bundle was exported from (or model_dir)."""

    name = "torch"

    def __init__(self, bundle: Bundle, model_dir: str | Path | None = None, threads: int = 0, model=None):
        """model: an already-loaded reference model of the bundle's task and dtype (skips loading)."""
        self.bundle = bundle
        self.model_dir = model_dir
        self.threads = threads
        self.model = model

    def __enter__(self) -> "TorchBackend":
        import torch

        from exporter.checkpoint import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.model is not None:
            return self
        manifest = self.bundle.manifest
        model_dir = self.model_dir or manifest["source"]["model_dir"]
        if not Path(model_dir).is_dir():
            raise BigCodeError(
                f"the torch backend needs the checkpoint: {model_dir} (recorded in the manifest) does not exist; "
                "pass --model MODEL_DIR"
            )
        self.model, _ = load_model(model_dir, task=manifest["task"], dtype=manifest["dtype"])
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def _forward(self, input_ids, attention_mask, position_ids, past):
        import torch

        with torch.no_grad():
            return self.model(
                torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)),
                None if position_ids is None else torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
                past,
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        past = [numpy_to_torch(feeds[n]) for n in self.bundle.past_names()]
        past = past if past and past[0].shape[-2] > 0 else None
        main, presents = self._forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("position_ids"), past)
        arrays = [main] + (list(presents) if self.bundle.present_names() else [])
        return {name: t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
                for name, t in zip(self.bundle.output_names, arrays)}

    def empty_cache(self, batch: int) -> Cache:
        return None

    def step(self, input_ids, attention_mask, position_ids, cache: Cache):
        logits, presents = self._forward(input_ids, attention_mask, position_ids, cache)
        return logits[:, -1].float().numpy(), list(presents)

    def select_rows(self, cache: Cache, rows: np.ndarray) -> Cache:
        import torch

        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return [t.index_select(0, index) for t in cache]


BACKENDS = ("ort", "ort-cuda", "torch", "tensorrt")


def open_backend(bundle: Bundle, backend: str = "ort", *, model_dir=None, threads: int = 0):
    """The backend object for a bundle (enter it with `with` to set it up)."""
    if backend == "ort":
        return OrtBackend(bundle, threads=threads)
    if backend == "ort-cuda":
        return OrtBackend(bundle, threads=threads, provider="cuda")
    if backend == "torch":
        return TorchBackend(bundle, model_dir=model_dir, threads=threads)
    if backend == "tensorrt":
        from runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, threads=threads)
    raise BigCodeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
