"""`bigcode-deploy lint BUNDLE --target tensorrt`: what TensorRT's ONNX parser would reject, found statically.

One line per problem. Checks: ops outside the parser's support list, an opset outside the parser's range (of the
TensorRT version given, else of the newest one known: runtime/tensorrt_engine.py's table), DOUBLE tensors, custom
ops without a plugin mapping, custom op names that collide with a built-in importer (the parser dispatches on the
op name alone, ignoring the domain), and graph input dims without a finite range in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.manifest import Manifest
from bigcode_deploy.runtime.tensorrt_engine import MIN_OPSET, PARSER_MAX_OPSET, parser_opsets

# The standard ops onnx-tensorrt's importer handles (its operator support matrix, TensorRT 9.2-10.x), plus
# Gelu (opset 20) and Attention (opset 23, parser 10.14+). Ops missing here are rejected by the parser.
TENSORRT_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split()
)
STANDARD_DOMAINS = ("", "ai.onnx")


def _tensor_types(model: onnx.ModelProto):
    graph = model.graph
    for v in [*graph.input, *graph.output, *graph.value_info]:
        yield v.name, v.type.tensor_type.elem_type
    for t in graph.initializer:
        yield t.name, t.data_type
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast":
                yield f"{node.name or node.output[0]} (Cast to)", attr.i
            if attr.type == onnx.AttributeProto.TENSOR:
                yield f"{node.name or node.output[0]} (attribute {attr.name})", attr.t.data_type


def opset_problem(opset: int | None, tensorrt_version: str | None = None) -> str | None:
    """The line for an opset TensorRT's parser would refuse, else None. tensorrt_version: the version the engine will
    be built with ("10.13.0"); None: any version this project knows (the newest one's range; build-engine then checks
    the installed version's). Raises BigCodeError for a version older than 10."""
    if tensorrt_version is not None:
        opsets, which = parser_opsets(tensorrt_version), f"TensorRT {tensorrt_version}'s"
    else:
        opsets, which = range(MIN_OPSET, max(PARSER_MAX_OPSET.values()) + 1), "every known TensorRT's"
    if opset is None:
        return "the graph imports no standard ONNX opset (ai.onnx): re-export it"
    if opset in opsets:
        return None
    return f"opset {opset} is outside {which} parser range {opsets.start}-{opsets.stop - 1}"


def lint_tensorrt(model: onnx.ModelProto, manifest: Manifest, tensorrt_version: str | None = None) -> list[str]:
    """What TensorRT's ONNX parser would reject in the graph, one line per problem (empty: none found).

    manifest: the bundle's Manifest; its dims give each symbolic input dim's range. tensorrt_version: judge the
    opset against that version's parser (None: the newest known; see opset_problem).
    """
    problems = []
    standard_opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    opset = opset_problem(standard_opset, tensorrt_version)
    if opset is not None:
        problems.append(opset)
    for name, elem_type in _tensor_types(model):
        if elem_type == onnx.TensorProto.DOUBLE:
            problems.append(f"tensor {name} is DOUBLE: TensorRT casts it down to FLOAT; make it float32")
    functions = {(f.domain, f.name) for f in model.functions}
    reported = set()
    for node in model.graph.node:
        key = (node.domain, node.op_type)
        if key in reported:
            continue
        if node.domain in STANDARD_DOMAINS:
            if node.op_type not in TENSORRT_OPS:
                problems.append(f"op {node.op_type} is not supported by TensorRT's ONNX parser")
                reported.add(key)
            continue
        attrs = {a.name for a in node.attribute}
        if node.op_type in TENSORRT_OPS:
            problems.append(
                f"custom op {node.domain}::{node.op_type} collides with the built-in {node.op_type} importer "
                "(the parser ignores domains): rename it"
            )
        elif not {"plugin_namespace", "plugin_version"} & attrs:
            problems.append(
                f"custom op {node.domain}::{node.op_type} has no plugin mapping (plugin_namespace / "
                "plugin_version attributes): inline it or map it to a plugin"
            )
        elif key not in functions:
            problems.append(
                f"custom op {node.domain}::{node.op_type} is mapped to a plugin but has no function body "
                "to fall back on"
            )
        reported.add(key)
    dims = manifest.dims
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                spec = dims.get(d.dim_param)
                if spec is None or spec.get("min") is None or spec.get("max") is None:
                    problems.append(
                        f"input {value.name} dim {d.dim_param!r} has no finite range in the manifest's dims "
                        "(an optimization profile needs min and max)"
                    )
    return sorted(set(problems), key=problems.index)


def lint_bundle(bundle_path: str | Path, target: str = "tensorrt", tensorrt_version: str | None = None) -> list[str]:
    """Lint a bundle's graph (not its external data) with its manifest (tensorrt_version: as lint_tensorrt).
    Raises BigCodeError for a target other than tensorrt, BundleError for a bundle that cannot be opened."""
    if target != "tensorrt":
        raise BigCodeError(f"lint knows the tensorrt target only (got {target!r})")
    bundle = Bundle.open(bundle_path)
    model = onnx.load(str(bundle.graph_path), load_external_data=False)
    return lint_tensorrt(model, bundle.manifest, tensorrt_version)
