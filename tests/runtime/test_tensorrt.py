"""TensorRT: the pure parts on the CPU; the engine build and backend where tensorrt and a CUDA device exist."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from exporter.errors import BigCodeError
from exporter.progress import quiet
from graphs.optimize import optimize_bundle
from runtime.cli import main
from runtime.tensorrt import (
    DECODE, PREFILL, EngineLimits, EngineMetadata, check_compatible, derive_profiles, engine_dir, engine_limits,
    io_bindings, profile_for,
)


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    from tests.graphs.conftest import make_hf_model
    from exporter.export import export_bundle

    root = tmp_path_factory.mktemp("trt")
    make_hf_model("causal-lm", seed=4).save_pretrained(root / "ckpt")
    portable = export_bundle(root / "ckpt", root / "fp16", dtype="fp16", check=False, progress=quiet)
    return optimize_bundle(portable, root / "trt", target="tensorrt", progress=quiet)


def manifest_of(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_profiles_cover_prefill_with_empty_past_and_decode(trt_bundle):
    manifest = manifest_of(trt_bundle)
    limits = engine_limits(manifest, max_batch=4, max_prompt=16, max_context=64)
    prefill, decode = derive_profiles(manifest, limits)
    assert prefill["input_ids"] == ((1, 1), (2, 8), (4, 16))
    assert prefill["past_key_values.0.key_value"] == ((1, 0, 16), (2, 0, 16), (4, 0, 16))
    assert prefill["attention_mask"] == ((1, 1), (2, 8), (4, 16))  # past 0 + sequence
    assert decode["input_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode["past_key_values.1.key_value"] == ((1, 1, 16), (2, 32, 16), (4, 63, 16))
    assert decode["attention_mask"] == ((1, 2), (2, 33), (4, 64))  # past + 1, never beyond the context
    assert set(prefill) == set(decode) == {i["name"] for i in manifest["inputs"]}
    assert profile_for(0) == PREFILL and profile_for(5) == DECODE


def test_mha_cache_profiles_keep_the_head_axis(trt_bundle):
    manifest = manifest_of(trt_bundle)
    manifest["inputs"][3]["shape"] = ["batch", 4, "past_sequence", 16]
    _, decode = derive_profiles(manifest, EngineLimits(max_batch=2, max_prompt=8, max_context=32))
    assert decode["past_key_values.0.key_value"] == ((1, 4, 1, 16), (1, 4, 16, 16), (2, 4, 31, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batch=9), "--max-batch 9 exceeds the bundle's batch range (max 8)"),
        (dict(max_context=65), "--max-context 65 must be in 1..64"),
        (dict(max_prompt=40, max_context=32), "--max-prompt 40 must be in 1..--max-context (32)"),
    ],
)
def test_limits_are_checked_against_the_manifest(trt_bundle, kwargs, message):
    args = dict(max_batch=None, max_prompt=None, max_context=None) | kwargs
    with pytest.raises(BigCodeError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        engine_limits(manifest_of(trt_bundle), **args)


def test_defaults_come_from_the_manifest(trt_bundle):
    assert engine_limits(manifest_of(trt_bundle), None, None, None) == EngineLimits(max_batch=8, max_prompt=32, max_context=64)


def test_engine_metadata_compatibility_names_the_mismatch(tmp_path):
    meta = EngineMetadata("10.13.0", "NVIDIA H100", [9, 0], {"model.onnx": "abc"}, [], {}, 1.0)
    check_compatible(meta, "10.13.0", (9, 0), {"model.onnx": "abc"})
    with pytest.raises(BigCodeError, match="built with TensorRT 10.13.0, this is TensorRT 11.0.0"):
        check_compatible(meta, "11.0.0", (9, 0), {"model.onnx": "abc"})
    with pytest.raises(BigCodeError, match=r"built for GPU architecture sm90 \(NVIDIA H100\), this GPU is sm89"):
        check_compatible(meta, "10.13.0", (8, 9), {"model.onnx": "abc"})
    with pytest.raises(BigCodeError, match="built from another graph"):
        check_compatible(meta, "10.13.0", (9, 0), {"model.onnx": "def"})
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(meta.__dict__))
    assert EngineMetadata.read(path) == meta
    path.write_text("{")
    with pytest.raises(BigCodeError, match="not a readable engine description"):
        EngineMetadata.read(path)


def test_engine_paths_and_io_mapping(trt_bundle):
    assert engine_dir("b", (9, 0), "10.13.0").as_posix() == "b/engine/sm90-trt10.13.0"
    bindings = {b["name"]: b for b in io_bindings(manifest_of(trt_bundle))}
    assert bindings["input_ids"] == {"name": "input_ids", "mode": "input", "trt_dtype": "INT64", "torch_dtype": "int64"}
    assert bindings["present.0.key_value"]["trt_dtype"] == "HALF" and bindings["logits"]["mode"] == "output"


HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the guard is not what runs")
def test_without_tensorrt_commands_say_so_in_one_line(trt_bundle):
    runner = CliRunner()
    for args in (["build-engine", str(trt_bundle)], ["verify", str(trt_bundle), "--backend", "tensorrt"],
                 ["generate", str(trt_bundle), "--ids", "1,2", "--backend", "tensorrt"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, args
        assert result.output.strip() == ("error: TensorRT is not available: `import tensorrt` failed (No module named "
                                         "'tensorrt'); install the `tensorrt` extra on a machine with an NVIDIA GPU")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not HAVE_TENSORRT or not _cuda(), reason="needs tensorrt and a CUDA device (not on this machine)")
def test_engine_build_and_parity_on_gpu(trt_bundle):
    from runtime.tensorrt import build_engine
    from runtime.verify import verify_bundle

    build_engine(trt_bundle, max_batch=4, max_prompt=16, max_context=64, progress=quiet)
    report = verify_bundle(trt_bundle, backend="tensorrt", steps=3)
    assert report.ok, report.table()
