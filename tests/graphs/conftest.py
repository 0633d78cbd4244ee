"""Tiny exported graphs for the rewrite-rule tests, and an ONNX Runtime before/after comparison."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from exporter.export import export_bundle
from exporter.progress import quiet
from tests.conftest import make_hf_model


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory):
    """{name: bundle dir}: 2-layer exports (MQA fp32, MHA fp32, MQA fp16) of transformers-made checkpoints."""
    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, dtype, multi_query in (("mqa", "fp32", True), ("mha", "fp32", False), ("mqa-fp16", "fp16", True)):
        model_dir = root / f"ckpt-{name}"
        make_hf_model("causal-lm", seed=3, multi_query=multi_query).save_pretrained(model_dir)
        out[name] = export_bundle(model_dir, root / name, dtype=dtype, check=False, progress=quiet)
    return out


def load_ir(bundle) -> ir.Model:
    return ir.load(bundle / "model.onnx")


def op_counts(model: ir.Model) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph.all_nodes():
        counts[(node.domain, node.op_type)] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


def feeds_for(proto: onnx.ModelProto, past_length: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A left-padded batch of 2 with 3 new tokens after a random past (cache inputs sized from the graph)."""
    rng = np.random.default_rng(seed)
    B, T = 2, 3
    feeds = {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, 50, (B, T)).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones((B, past_length + T), dtype=np.int64)
            mask[1, :past_length + 1] = 0
            feeds[value.name] = mask
        elif value.name == "position_ids":
            positions = np.cumsum(feeds["attention_mask"], 1) - 1
            positions[feeds["attention_mask"] == 0] = 1
            feeds[value.name] = positions[:, past_length:]
        else:
            shape = [B if d.dim_param == "batch" else past_length if d.dim_param else d.dim_value for d in dims]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_same_outputs(before: dict, after: dict, atol: float = 1e-5) -> None:
    assert before.keys() == after.keys()
    for name in before:
        expected, actual = before[name], after[name]
        if actual.shape != expected.shape and name == "logits":
            expected = expected[:, -1:]
        np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), atol=atol, rtol=0,
                                   err_msg=name)
