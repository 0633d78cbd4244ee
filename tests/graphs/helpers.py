"""Helpers of the rewrite-rule tests: graph loading, op counts, ONNX Runtime runs, and hand-built graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from bigcode_deploy.exporter.onnx_functions import masked_softmax_function  # the exporter's own body
from bigcode_deploy.runtime.manifest import DOMAIN, DOMAIN_VERSION, MASKED_SOFTMAX

OPSET = 18
FLOAT_MIN = float(np.finfo(np.float32).min)
FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL
B, T, S, H, D = 2, 3, 5, 4, 8  # the hand-built attention: batch, new tokens, keys, heads, head_dim
E = H * D


def load_ir(bundle) -> ir.Model:
    """The bundle's graph as an onnx_ir model."""
    return ir.load(bundle / "model.onnx")


def op_counts(model: ir.Model) -> dict[tuple[str, str], int]:
    """{(domain, op_type): number of nodes}, subgraphs included."""
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
            mask[1, : past_length + 1] = 0
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


def random_feeds(model: ir.Model | onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for a hand-built graph with static input shapes (bool inputs: a causal-like mask)."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.7
            feeds[value.name][..., 0] = True  # every row sees at least one key
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the graph on ONNX Runtime's CPU provider."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_same_outputs(before: dict, after: dict, atol: float = 1e-5) -> None:
    """Same output names and values within atol; logits cut to the last position when the graph now has one."""
    assert before.keys() == after.keys()
    for name in before:
        expected, actual = before[name], after[name]
        if actual.shape != expected.shape and name == "logits":
            expected = expected[:, -1:]
        np.testing.assert_allclose(
            actual.astype(np.float32), expected.astype(np.float32), atol=atol, rtol=0, err_msg=name
        )


def masked_softmax_node(scores: str, mask: str, out: str, scale: float = 1.0) -> onnx.NodeProto:
    """A bigcode::FusedMaskedSoftmax node with fp32 softmax."""
    return helper.make_node(
        MASKED_SOFTMAX,
        [scores, mask],
        [out],
        domain=DOMAIN,
        scale=scale,
        mask_value=FLOAT_MIN,
        softmax_dtype=TensorProto.FLOAT,
    )


def i64(name: str, values: list[int]) -> onnx.TensorProto:
    """An int64 1-D initializer."""
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def make_model(nodes, inputs, outputs, initializers=(), functions=()) -> ir.Model:
    """A checked, shape-inferred ONNX model (opset 18, plus bigcode / com.microsoft when used) as onnx_ir."""
    inputs = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs]
    outputs = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in outputs]
    graph = helper.make_graph(list(nodes), "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", OPSET)]
    if functions or any(n.domain == DOMAIN for n in nodes):
        opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    if any(n.domain == "com.microsoft" for n in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    proto = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))  # shapes recorded, as an export


def folded_mqa_model(layers=1, key_perm=(0, 2, 1), scores_shape=(0, -1, H, S), out_shape=(0, -1, E)) -> ir.Model:
    """`layers` folded-heads MQA attentions in a chain (each output is the next query), sharing K, V and mask.

    The export's form: Reshape(q) -> MatMul(., Transpose(k)) -> Reshape -> FusedMaskedSoftmax -> Reshape ->
    MatMul(., v) -> Reshape. key_perm (1, 2, 0) takes a key stored (S, B, D).
    """
    key_shape = [B, S, D] if key_perm == (0, 2, 1) else [S, B, D]
    inits = [
        i64("q_shape", [0, -1, D]),
        i64("scores_shape", list(scores_shape)),
        i64("probs_shape", [0, -1, S]),
        i64("out_shape", list(out_shape)),
    ]
    nodes = []
    q = "query"
    for i in range(layers):
        nodes += [
            helper.make_node("Reshape", [q, "q_shape"], [f"q_rows{i}"]),
            helper.make_node("Transpose", ["key"], [f"key_t{i}"], perm=list(key_perm)),  # one per layer, as exported
            helper.make_node("MatMul", [f"q_rows{i}", f"key_t{i}"], [f"qk{i}"]),
            helper.make_node("Reshape", [f"qk{i}", "scores_shape"], [f"scores{i}"]),
            masked_softmax_node(f"scores{i}", "mask", f"probs{i}", scale=float(i + 1)),
            helper.make_node("Reshape", [f"probs{i}", "probs_shape"], [f"probs_rows{i}"]),
            helper.make_node("MatMul", [f"probs_rows{i}", "value"], [f"rows{i}"]),
            helper.make_node("Reshape", [f"rows{i}", "out_shape"], [f"out{i}"]),
        ]
        q = f"out{i}"
    nodes.append(helper.make_node("Identity", [q], ["out"]))
    inputs = [
        ("query", FLOAT, [B, T, E]),
        ("key", FLOAT, key_shape),
        ("value", FLOAT, [B, S, D]),
        ("mask", BOOL, [B, T, 1, S]),
    ]
    return make_model(nodes, inputs, [("out", FLOAT, ["batch", "rows", "width"])], inits, [masked_softmax_function()])


def tanh_gelu_model(cubic: float = 0.044715) -> ir.Model:
    """y = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + cubic * x^3))), as torch exports GELU(approximate='tanh')."""
    scalars = {"three": 3.0, "cubic": cubic, "sqrt_2_pi": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
    inits = [helper.make_tensor(name, FLOAT, [], [value]) for name, value in scalars.items()]
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["x3"]),
        helper.make_node("Mul", ["cubic", "x3"], ["t2"]),
        helper.make_node("Add", ["x", "t2"], ["t3"]),
        helper.make_node("Mul", ["sqrt_2_pi", "t3"], ["t4"]),
        helper.make_node("Tanh", ["t4"], ["t5"]),
        helper.make_node("Add", ["t5", "one"], ["t6"]),
        helper.make_node("Mul", ["half", "t6"], ["t7"]),
        helper.make_node("Mul", ["x", "t7"], ["y"]),
    ]
    return make_model(nodes, [("x", FLOAT, [2, 3, 8])], [("y", FLOAT, [2, 3, 8])], inits)
