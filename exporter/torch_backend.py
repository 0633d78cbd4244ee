"""The torch reference model as a runtime backend (the ground truth every graph is compared with).

Same contract as bigcode_deploy.runtime.backends (run / empty_cache / step / select_rows, a context manager).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from bigcode_deploy.exporter.checkpoint import check_source, load_model
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError

Cache = list  # of torch.Tensor, one merged K|V tensor per layer


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, also for bfloat16 arrays (ml_dtypes), which numpy itself does not know."""
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class TorchBackend:
    """The torch reference model, loaded from the checkpoint the bundle was exported from (or model_dir, which must
    hold the same files: entering raises CheckpointError when their sha256 differ from the manifest's record)."""

    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        model_dir: str | Path | None = None,
        threads: int = 0,
        model=None,
        source_checked: bool = False,
    ):
        """model: an already-loaded reference model of the bundle's task and dtype (skips loading).
        source_checked: the caller has already compared the checkpoint's sha256 with the manifest (skips hashing
        every weight file a second time)."""
        self.bundle = bundle
        self.model_dir = model_dir
        self.threads = threads
        self.model = model
        self.source_checked = source_checked

    def __enter__(self) -> TorchBackend:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.model is not None:
            return self
        manifest = self.bundle.manifest
        model_dir = self.model_dir or manifest.source.get("model_dir", "")
        if not Path(model_dir).is_dir():
            where = "(passed as --model)" if self.model_dir else "(recorded in the manifest)"
            raise BigCodeError(
                f"the torch backend needs the checkpoint: {model_dir} {where} does not exist; pass --model MODEL_DIR"
            )
        if not self.source_checked:
            check_source(model_dir, manifest.source)  # the checkpoint the bundle was exported from, unchanged
        self.model, _ = load_model(model_dir, task=manifest.task, dtype=manifest.dtype)
        return self

    def __exit__(self, *exc) -> None:
        self.model = None

    def _forward(self, input_ids, attention_mask, position_ids, past):
        with torch.no_grad():
            return self.model(
                torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)),
                None if position_ids is None else torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
                past,
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = next(self.model.parameters()).dtype  # bf16 presents come back as fp32 numpy (lossless): cast back
        past = [numpy_to_torch(feeds[n]).to(dtype) for n in self.bundle.past_names()]
        past = past if past and past[0].shape[-2] > 0 else None
        main, presents = self._forward(feeds["input_ids"], feeds["attention_mask"], feeds.get("position_ids"), past)
        arrays = [main] + (list(presents) if self.bundle.present_names() else [])
        return {
            name: t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
            for name, t in zip(self.bundle.output_names, arrays)
        }

    def empty_cache(self, batch: int) -> Cache:
        return None

    def step(self, input_ids, attention_mask, position_ids, cache: Cache):
        logits, presents = self._forward(input_ids, attention_mask, position_ids, cache)
        return logits[:, -1].float().numpy(), list(presents)

    def select_rows(self, cache: Cache, rows: np.ndarray) -> Cache:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return [t.index_select(0, index) for t in cache]
