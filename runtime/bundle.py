"""Open a deployment bundle from its manifest alone: validation, file checks, and the feeds its graph needs.

What a Python runtime does here, a C++ service can do from the same manifest.json (runtime/manifest.py documents
the format).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigcode_deploy.runtime.errors import BundleError
from bigcode_deploy.runtime.hashing import sha256_file
from bigcode_deploy.runtime.manifest import (
    BATCH,
    MANIFEST_FILE,
    NUMPY_DTYPES,
    PAST,
    QUANTIZATION_BITS,
    KVCache,
    Manifest,
)


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify_hash: bool = True) -> Bundle:
        """Read and validate manifest.json; check that the graph files exist and (verify_hash) match their sha256.

        Raises BundleError (one line naming the file and what to do) for anything missing, malformed or changed.
        """
        if not isinstance(path, (str, Path)) or not str(path):
            raise BundleError(f"a bundle path must be a non-empty str or Path, not {path!r}")
        path = Path(path)
        manifest = Manifest.read(path)
        for name in manifest.graph.names:
            file = path / name
            if not file.is_file():
                raise BundleError(f"{file} is missing from the bundle; re-export it")
            if verify_hash and sha256_file(file) != manifest.graph.sha256.get(name):
                raise BundleError(
                    f"{file} does not match the sha256 in manifest.json (the graph changed after export); re-export "
                    "or re-optimize the bundle"
                )
        bundle = cls(path, manifest)
        if manifest.quantization is not None:
            bundle._check_quantization_claim()
        return bundle

    def _check_quantization_claim(self) -> None:
        """A manifest that claims weight-only quantization gets the quantized criteria (looser than elementwise):
        the graph must hold the MatMulNBits nodes that the claim is about."""
        import onnx

        try:
            graph = onnx.load(str(self.graph_path), load_external_data=False).graph
        except Exception as exc:  # onnx raises protobuf's DecodeError for a file that is not a model
            raise BundleError(f"{self.graph_path} is not an ONNX model ({type(exc).__name__}); re-export it") from None
        scheme = self.manifest.quantization.get("scheme")
        bits = {
            next((a.i for a in n.attribute if a.name == "bits"), None)
            for n in graph.node
            if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
        }
        if bits != {QUANTIZATION_BITS[scheme]}:
            raise BundleError(
                f"{self.path / MANIFEST_FILE} claims {scheme} quantization but the graph's MatMulNBits nodes have "
                f"bits {sorted(b for b in bits if b is not None) or 'none'}; re-optimize the bundle"
            )

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest.graph.file

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    @property
    def kv_cache(self) -> KVCache | None:
        return self.manifest.kv_cache

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    @property
    def output_names(self) -> list[str]:
        return self.manifest.output_names

    def past_names(self) -> list[str]:
        return self.manifest.past_names()

    def present_names(self) -> list[str]:
        return self.manifest.present_names()

    def empty_past_shape(self, batch: int) -> list[int]:
        """The shape of each cache input at the first step (past_sequence = 0)."""
        return [batch if d == BATCH else 0 if d == PAST else d for d in self.kv_cache.past_shape]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The first step's past: every cache input with past_sequence = 0."""
        return self.empty_past_for(self.manifest, batch)

    @staticmethod
    def empty_past_for(manifest: Manifest, batch: int) -> dict[str, np.ndarray]:
        kv = manifest.kv_cache
        if kv is None:
            return {}
        shape = [batch if d == BATCH else 0 if d == PAST else d for d in kv.past_shape]
        return {name: np.zeros(shape, dtype=NUMPY_DTYPES[kv.dtype]) for name in manifest.past_names()}


def position_ids(attention_mask: np.ndarray, past_length: int) -> np.ndarray:
    """cumsum(mask) - 1 with padded slots set to 1, sliced to the new tokens: the reference's rule.

    attention_mask (B, P + T) int64 -> position_ids (B, T) int64.
    """
    positions = np.cumsum(attention_mask, axis=1) - 1  # (B, P + T)
    positions[attention_mask == 0] = 1
    return positions[:, past_length:].astype(np.int64)


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (B, T) int64 for prompts of different lengths, left-padded with id 0."""
    T = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), T), dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :] = p
        mask[row, T - len(p) :] = 1
    return ids, mask
