"""Open a deployment bundle from its manifest alone: validation, file checks, and the feeds its graph needs.

What a Python runtime does here, a C++ service can do from the same manifest.json (runtime/manifest.py documents
the format).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
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

GRAPH_LIMIT = 2**31 - 1  # protobuf's limit: no ONNX file (without its external data) is larger
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL (onnx.proto)
IN_MEMORY_DATA_LIMIT = 2 << 30  # external data up to this size is handed to ONNX Runtime from the hashed buffer


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify_hash: bool = True) -> Bundle:
        """Read and validate manifest.json, then check the files it names and the graph itself.

        Every named file that exists (graph, external data, tokenizer, reference, Hugging Face files) must be a
        regular file that resolves inside the bundle directory (a symlink out of it is refused); the graph files
        must exist and (verify_hash) match their sha256. The graph, parsed from the very bytes that were hashed,
        must name no external data but the manifest's data file, within that file; its position table must hold
        config.n_positions rows; a quantization claim must match its MatMulNBits nodes. Raises BundleError (one
        line naming the file and what to do) for anything missing, malformed, outside or changed.
        """
        if not isinstance(path, (str, Path)) or not str(path):
            raise BundleError(f"a bundle path must be a non-empty str or Path, not {path!r}")
        path = Path(path)
        manifest = Manifest.read(path)
        bundle = cls(path, manifest)
        for name in manifest.graph.names:
            bundle.file(name, "the graph")
        for name in [manifest.tokenizer, manifest.reference.file if manifest.reference else None, *manifest.hf_files]:
            if name is not None and os.path.lexists(path / name):
                bundle.file(name, "named in manifest.json")
        model_bytes = bundle.read_verified(manifest.graph.file) if verify_hash else bundle.read_graph_unverified()
        if verify_hash and manifest.graph.external_data:
            data = bundle.file(manifest.graph.external_data, "the graph's external data")
            try:
                digest = sha256_file(data)
            except OSError as exc:
                raise BundleError(f"cannot read {data} ({exc.strerror}); check its permissions") from None
            if digest != manifest.graph.sha256.get(manifest.graph.external_data):
                raise BundleError(
                    f"{data} does not match the sha256 in manifest.json (the graph changed after export); re-export "
                    "or re-optimize the bundle"
                )
        bundle._check_graph(bundle.parse_graph(model_bytes))
        return bundle

    # --- files ----------------------------------------------------------------------------------------------
    def file(self, name: str, what: str) -> Path:
        """The bundle's file `name` (a plain name: the manifest's schema checked it): a regular file that resolves
        inside the bundle directory. Raises BundleError when it is missing, a link out of the bundle, or not a
        regular file."""
        path = self.path / name
        try:
            resolved = path.resolve(strict=True)
            root = self.path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a dangling link, a link loop
            raise BundleError(f"{path} is missing from the bundle ({what}); re-export it") from None
        if resolved.parent != root:
            raise BundleError(
                f"{path} ({what}) resolves to {resolved}, outside the bundle directory; a bundle may reference only "
                "files inside it: re-export it"
            )
        if not resolved.is_file():
            raise BundleError(f"{path} ({what}) is not a regular file; re-export the bundle")
        return path

    def read_verified(self, name: str, limit: int = GRAPH_LIMIT) -> bytes:
        """The bytes of graph file `name`, read once and checked against manifest.json's sha256: what a caller
        parses or hands to ONNX Runtime is what was hashed. Raises BundleError (missing, too large, changed)."""
        path = self.file(name, "the graph" if name == self.manifest.graph.file else "the graph's external data")
        data = self._read(path, limit)
        if hashlib.sha256(data).hexdigest() != self.manifest.graph.sha256.get(name):
            raise BundleError(
                f"{path} does not match the sha256 in manifest.json (the graph changed after export); re-export "
                "or re-optimize the bundle"
            )
        return data

    def read_graph_unverified(self) -> bytes:
        return self._read(self.file(self.manifest.graph.file, "the graph"), GRAPH_LIMIT)

    @staticmethod
    def _read(path: Path, limit: int) -> bytes:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise BundleError(f"{path} is larger than {limit} bytes, more than it can be; re-export the bundle")
                data = f.read(size + 1)
        except OSError as exc:
            raise BundleError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
        if len(data) != size:
            raise BundleError(f"{path} changed while it was read; open the bundle again")
        return data

    def graph_buffers(self) -> tuple[bytes, dict[str, bytes]]:
        """(model.onnx's bytes, {external data file name: its bytes}), each read once and checked against its
        sha256: ONNX Runtime loads these buffers, never the files again (no change between check and load). An
        external data file larger than IN_MEMORY_DATA_LIMIT is left out of the dict (holding it once more in memory
        while ONNX Runtime copies it would double the load's peak): the caller lets ONNX Runtime read it from the
        bundle directory and then checks it with `check_external_data_unchanged`."""
        g = self.manifest.graph
        external = {}
        if g.external_data:
            path = self.file(g.external_data, "the graph's external data")
            if path.stat().st_size <= IN_MEMORY_DATA_LIMIT:
                external[g.external_data] = self.read_verified(g.external_data, IN_MEMORY_DATA_LIMIT)
        return self.read_verified(g.file), external

    def check_external_data_unchanged(self) -> None:
        """Hash the external data file again (after ONNX Runtime read it from the bundle directory). Raises
        BundleError when it no longer matches the manifest's sha256."""
        name = self.manifest.graph.external_data
        path = self.file(name, "the graph's external data")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
        if digest != self.manifest.graph.sha256.get(name):
            raise BundleError(f"{path} changed while ONNX Runtime loaded it (sha256); re-export the bundle")

    def parse_graph(self, model_bytes: bytes):
        """onnx.ModelProto from the graph's bytes (external data not loaded). Raises BundleError for a file that is
        not an ONNX model."""
        import onnx

        try:
            return onnx.load_model_from_string(model_bytes)
        except Exception as exc:  # protobuf's DecodeError (and RecursionError for deep nesting)
            raise BundleError(f"{self.graph_path} is not an ONNX model ({type(exc).__name__}); re-export it") from None

    def graph_model(self):
        """The graph as onnx.ModelProto, parsed from verified bytes (external data not loaded)."""
        return self.parse_graph(self.read_verified(self.manifest.graph.file))

    # --- the graph against the manifest ----------------------------------------------------------------------
    def _check_graph(self, model) -> None:
        self._check_external_data(model)
        self._check_io_names(model.graph)
        self._check_position_table(model.graph)
        if self.manifest.quantization is not None:
            self._check_quantization_claim(model.graph)

    def _check_external_data(self, model) -> None:
        """Every tensor stored outside model.onnx (initializers, constants, in the graph, its subgraphs and its
        functions) must name the manifest's data file as its location, within that file: ONNX Runtime would
        otherwise read whatever path the graph names."""
        name = self.manifest.graph.external_data
        size = None
        if name is not None:
            with contextlib.suppress(OSError):
                size = (self.path / name).stat().st_size
        for tensor in external_tensors(model):
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location")
            if name is None or location != name:
                raise BundleError(
                    f"{self.graph_path}: tensor {tensor.name[:80]!r} names external data {str(location)[:80]!r}; a "
                    f"bundle's graph may reference only {name or 'no external data'} (manifest.json): re-export it"
                )
            try:
                offset, length = int(entries.get("offset", 0)), int(entries.get("length", -1))
            except ValueError:
                offset, length = -1, -1
            if offset < 0 or (size is not None and (length < 0 or offset + length > size)):
                raise BundleError(
                    f"{self.graph_path}: tensor {tensor.name[:80]!r} lies outside {name} (offset {offset}, length "
                    f"{length}, file {size} bytes); re-export the bundle"
                )

    def _check_io_names(self, graph) -> None:
        """The graph's own input and output names, in order, must be the manifest's (dtypes and shapes are checked
        against ONNX Runtime's view when a backend loads it)."""
        initializers = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initializers]
        outputs = [o.name for o in graph.output]
        for kind, found, expected in (
            ("inputs", inputs, self.manifest.input_names),
            ("outputs", outputs, self.manifest.output_names),
        ):
            if found != expected:
                raise BundleError(
                    f"{self.graph_path}'s {kind} ({len(found)}: {', '.join(found)[:120]}) are not the ones "
                    f"manifest.json names ({len(expected)}); re-export the bundle"
                )

    def _check_position_table(self, graph) -> None:
        """config.n_positions must not exceed the rows of the graph's position table (the Gather of position_ids,
        or the initializer named *wpe.weight): a manifest promising more would index past its end."""
        tables = {i.name: i for i in graph.initializer}
        table = next(
            (
                tables[n.input[0]]
                for n in graph.node
                if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "position_ids" and n.input[0] in tables
            ),
            next((t for name, t in tables.items() if name.endswith("wpe.weight")), None),
        )
        n_positions = self.manifest.config["n_positions"]
        if table is None or len(table.dims) != 2:
            raise BundleError(
                f"{self.graph_path} has no position table (a Gather of position_ids from a 2-d initializer); "
                "re-export the bundle"
            )
        if n_positions > table.dims[0]:
            raise BundleError(
                f"{self.path / MANIFEST_FILE}: config.n_positions is {n_positions} but the graph's position table "
                f"{table.name!r} holds {table.dims[0]} rows; re-export the bundle"
            )

    def _check_quantization_claim(self, graph) -> None:
        """A manifest that claims weight-only quantization gets the quantized criteria (looser than elementwise):
        the graph must hold the MatMulNBits nodes that the claim is about."""
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


def external_tensors(model) -> Iterator:
    """Every TensorProto of the model stored as external data: initializers, sparse initializers and attribute
    tensors of the main graph, of every subgraph and of every model-local function."""

    def of_tensor(t) -> Iterator:
        if t.data_location == EXTERNAL or len(t.external_data):
            yield t

    def of_nodes(nodes) -> Iterator:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield from of_tensor(a.t)
                for t in a.tensors:
                    yield from of_tensor(t)
                for sparse in [a.sparse_tensor] if a.HasField("sparse_tensor") else []:
                    yield from of_tensor(sparse.values)
                    yield from of_tensor(sparse.indices)
                for sparse in a.sparse_tensors:
                    yield from of_tensor(sparse.values)
                    yield from of_tensor(sparse.indices)
                if a.HasField("g"):
                    yield from of_graph(a.g)
                for g in a.graphs:
                    yield from of_graph(g)

    def of_graph(graph) -> Iterator:
        for t in graph.initializer:
            yield from of_tensor(t)
        for sparse in graph.sparse_initializer:
            yield from of_tensor(sparse.values)
            yield from of_tensor(sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)
