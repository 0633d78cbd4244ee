import json

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bigcode_deploy.graphs.lint import lint_bundle, lint_tensorrt
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.manifest import GraphFiles, Manifest

DIMS = {"batch": {"min": 1, "max": 8}}
CONFIG = {"vocab_size": 11, "n_positions": 16, "n_layer": 1, "n_embd": 8, "n_head": 2, "multi_query": True}


def manifest(dims) -> Manifest:
    """A typed manifest (only its dims matter to the lint)."""
    m = Manifest.build(
        CONFIG,
        task="base",
        dtype="fp32",
        opset=18,
        use_cache=False,
        package_version="0",
        graph=GraphFiles("model.onnx", None, {}),
        source={},
        tokenizer=None,
        custom_ops_used=[],
    )
    m.dims = dims
    return m


def tiny_model(nodes, opset=18, extra_inputs=(), functions=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(nodes, "g", [x, *extra_inputs], [y])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("custom", 1)],
        functions=list(functions),
    )


def test_clean_graph_has_no_problems():
    assert lint_tensorrt(tiny_model([helper.make_node("Relu", ["x"], ["y"])]), manifest(DIMS)) == []


def test_each_problem_is_one_line():
    double = helper.make_tensor_value_info("d", TensorProto.DOUBLE, [4])
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("Softmax", ["x"], ["s"], domain="custom"),
        helper.make_node("MyOp", ["x"], ["m"], domain="custom"),
        helper.make_node("Mapped", ["x"], ["y"], domain="custom", plugin_namespace="", plugin_version="1"),
    ]
    problems = lint_tensorrt(tiny_model(nodes, opset=25, extra_inputs=[double]), manifest({}))
    assert problems == [
        "opset 25 is outside every known TensorRT's parser range 9-24",
        "tensor d is DOUBLE: TensorRT casts it down to FLOAT; make it float32",
        "op Unique is not supported by TensorRT's ONNX parser",
        "custom op custom::Softmax collides with the built-in Softmax importer (the parser ignores domains): rename it",
        "custom op custom::MyOp has no plugin mapping (plugin_namespace / plugin_version attributes): inline it or "
        "map it to a plugin",
        "custom op custom::Mapped is mapped to a plugin but has no function body to fall back on",
        "input x dim 'batch' has no finite range in the manifest's dims (an optimization profile needs min and max)",
    ]


@pytest.mark.parametrize(
    "opset, version, problem",
    [
        (20, "10.0.1", None),
        (21, "10.0.1", "opset 21 is outside TensorRT 10.0.1's parser range 9-20"),
        (23, "10.14.1", "opset 23 is outside TensorRT 10.14.1's parser range 9-20"),  # 9-24 from 10.15 only
        (23, "10.15.1", None),
        (24, "11.2.0", None),
        (8, "10.15.1", "opset 8 is outside TensorRT 10.15.1's parser range 9-24"),
        (23, None, None),
        (8, None, "opset 8 is outside every known TensorRT's parser range 9-24"),
    ],
)
def test_the_opset_range_is_the_named_tensorrt_versions(opset, version, problem):
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"])], opset=opset)
    assert lint_tensorrt(model, manifest(DIMS), tensorrt_version=version) == ([problem] if problem else [])


def test_build_engine_checks_the_opset_against_the_installed_tensorrt():
    from bigcode_deploy.runtime.tensorrt_engine import check_opset, parser_opsets

    assert parser_opsets("10.3.0") == range(9, 21) and parser_opsets("11.0.0") == range(9, 25)
    check_opset(18, "10.0.0")
    with pytest.raises(BigCodeError) as err:
        check_opset(23, "10.8.0")
    assert str(err.value) == (
        "the graph's opset 23 is outside TensorRT 10.8.0's parser range 9-20: install TensorRT >= 10.15 or export "
        "with --opset 20"
    )
    with pytest.raises(BigCodeError, match="TensorRT version '9.2.0' is not 10.x or newer"):
        parser_opsets("9.2.0")


def test_unbounded_dim_in_the_manifest_is_a_problem():
    problems = lint_tensorrt(
        tiny_model([helper.make_node("Relu", ["x"], ["y"])]), manifest({"batch": {"min": 1, "max": None}})
    )
    assert problems == [
        "input x dim 'batch' has no finite range in the manifest's dims (an optimization profile needs min and max)"
    ]


def test_plugin_mapped_op_with_function_body_passes():
    body = helper.make_function(
        "custom", "Mapped", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 18)]
    )
    node = helper.make_node("Mapped", ["x"], ["y"], domain="custom", plugin_namespace="", plugin_version="1")
    assert lint_tensorrt(tiny_model([node], functions=[body]), manifest(DIMS)) == []


def test_lint_bundle_knows_tensorrt_only(tmp_path):
    with pytest.raises(BigCodeError, match="lint knows the tensorrt target only"):
        lint_bundle(tmp_path, target="ort")


# --- on exported bundles --------------------------------------------------------------------------------------


def test_lint_bundle_reads_the_typed_manifest(tiny_bundles):
    problems = lint_bundle(tiny_bundles["mqa"])
    assert (
        "custom op bigcode::FusedMaskedSoftmax has no plugin mapping (plugin_namespace / plugin_version "
        "attributes): inline it or map it to a plugin" in problems
    )


def test_cli_lint_on_exported_bundle_fails_and_tensorrt_bundle_passes(tiny_bundles, tmp_path):
    from bigcode_deploy.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["lint", str(tiny_bundles["mqa"])])
    assert result.exit_code == 1
    assert "custom op bigcode::FusedMaskedSoftmax has no plugin mapping" in result.output
    result = runner.invoke(
        main, ["optimize", str(tiny_bundles["mqa-fp16"]), str(tmp_path / "trt"), "--target", "tensorrt"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["lint", str(tmp_path / "trt")])
    assert result.exit_code == 0 and "no problems" in result.output
    result = runner.invoke(main, ["lint", str(tmp_path / "trt"), "--tensorrt-version", "10.3.0"])
    assert result.exit_code == 0 and "no problems for tensorrt (TensorRT 10.3.0)" in result.output
    result = runner.invoke(main, ["lint", str(tmp_path / "trt"), "--tensorrt-version", "8.6"])
    assert result.exit_code == 2 and "TensorRT version '8.6' is not 10.x or newer" in result.output
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["dims"]["batch"] == {"min": 1, "max": 8}
    assert not onnx.load(str(tmp_path / "trt" / "model.onnx")).functions
