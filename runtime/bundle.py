"""Open a deployment bundle from its manifest alone: validation, and the feeds its graph needs.

Imports nothing from exporter/: what a Python runtime does here, a C++ service can do from the same manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from exporter.errors import BigCodeError

FORMAT = "bigcode-deploy-bundle"
FORMAT_VERSION = 1
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64}


class BundleError(BigCodeError):
    """A bundle that cannot be used: missing files, another format version, a graph that changed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, verify_hash: bool = True) -> "Bundle":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle: manifest.json is missing (create one with `bigcode-deploy export`)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export the bundle") from None
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path} is not a {FORMAT} manifest; re-export the bundle")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path} has format_version {manifest.get('format_version')!r}; this runtime reads "
                f"{FORMAT_VERSION}: re-export the bundle with this version of bigcode-deploy"
            )
        bundle = cls(path, manifest)
        graph = manifest["graph"]
        for name in [graph["file"]] + ([graph["external_data"]] if graph.get("external_data") else []):
            file = path / name
            if not file.is_file():
                raise BundleError(f"{file} is missing from the bundle; re-export it")
            if verify_hash and sha256_file(file) != graph["sha256"].get(name):
                raise BundleError(
                    f"{file} does not match the sha256 in manifest.json (the graph changed after export); re-export "
                    "or re-optimize the bundle"
                )
        return bundle

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def kv_cache(self) -> dict[str, Any] | None:
        return self.manifest["kv_cache"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def past_names(self) -> list[str]:
        kv = self.kv_cache
        return [kv["past_input"].format(layer=i) for i in range(kv["num_layers"])] if kv else []

    def present_names(self) -> list[str]:
        kv = self.kv_cache
        return [kv["present_output"].format(layer=i) for i in range(kv["num_layers"])] if kv else []

    def empty_past_shape(self, batch: int) -> list[int]:
        """The shape of each cache input at the first step (past_sequence = 0)."""
        return [batch if d == "batch" else 0 if d == "past_sequence" else d for d in self.kv_cache["past_shape"]]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The first step's past: every cache input with past_sequence = 0."""
        kv = self.kv_cache
        if kv is None:
            return {}
        shape = self.empty_past_shape(batch)
        dtype = NUMPY_DTYPES.get(kv["dtype"])
        if dtype is None:
            raise BundleError(f"cache dtype {kv['dtype']} has no numpy equivalent on this runtime")
        return {name: np.zeros(shape, dtype=dtype) for name in self.past_names()}


def position_ids(attention_mask: np.ndarray, past_length: int) -> np.ndarray:
    """cumsum(mask) - 1 with padded slots set to 1, sliced to the new tokens: the reference's rule."""
    positions = np.cumsum(attention_mask, axis=1) - 1  # (B, P + T)
    positions[attention_mask == 0] = 1
    return positions[:, past_length:].astype(np.int64)


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (B, T) for prompts of different lengths, left-padded with id 0."""
    T = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), T), dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = p
        mask[row, T - len(p):] = 1
    return ids, mask


def numpy_to_torch(array: np.ndarray):
    """torch.from_numpy, also for bfloat16 arrays (ml_dtypes), which numpy itself does not know."""
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)
