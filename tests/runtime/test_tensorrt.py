"""TensorRT: the pure parts on the CPU (profiles, limits, metadata, paths, I/O checks, the CUDA copy plans, the
refusals and "not available" lines); the engine build, backend and device copies where tensorrt, cuda-python and a
CUDA device exist."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.runtime import cuda
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BackendUnavailable, BigCodeError
from bigcode_deploy.runtime.hashing import sha256_file
from bigcode_deploy.runtime.manifest import ONNX_TENSOR_TYPES, GraphFiles, Manifest
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.tensorrt_build import build_engine
from bigcode_deploy.runtime.tensorrt_engine import (
    DECODE,
    PREFILL,
    EngineLimits,
    EngineMetadata,
    TensorBinding,
    check_compatible,
    check_engine_io,
    derive_profiles,
    engine_dir,
    engine_limits,
    input_shape_error,
    io_bindings,
    profile_for,
    timing_cache_file,
)
from bigcode_deploy.workflows.build_engine import build_engine_for

CONFIG = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100, multi_query=True)  # 2*head_dim 16
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NOT_AVAILABLE = (
    "TensorRT is not available: `import tensorrt` failed (No module named 'tensorrt'); install the `tensorrt` "
    "extra on a machine with an NVIDIA GPU"
)


def make_manifest(target: str = "tensorrt", sha256: dict | None = None, last_token: bool = False, **config) -> Manifest:
    portable = Manifest.build(
        CONFIG | config, task="causal-lm", dtype="fp16", opset=18, use_cache=True, package_version="0",
        graph=GraphFiles("model.onnx", None, sha256 or {"model.onnx": "0" * 64}), source={}, tokenizer=None,
        custom_ops_used=[],
    )  # fmt: skip
    if target == "portable":
        return portable
    graph = GraphFiles("model.onnx", None, sha256 or {"model.onnx": "0" * 64})
    return portable.derive(
        target=target, passes=[], custom_ops_used=[], graph=graph, max_batch=8, last_token_logits=last_token
    )


def write_bundle(path, target: str, last_token: bool = False):
    """A bundle directory that opens (manifest + a graph file matching its sha256); its graph is an empty ONNX."""
    path.mkdir(parents=True)
    manifest = make_manifest(target, None, last_token)
    # Parses, with the manifest's I/O names and the position table Bundle.open looks for (n_positions rows); no
    # node computes anything: nothing here runs it.
    wpe = onnx.numpy_helper.from_array(np.zeros((CONFIG["n_positions"], 1), np.float32), "transformer.wpe.weight")

    def value_infos(specs):
        return [onnx.helper.make_tensor_value_info(t.name, ONNX_TENSOR_TYPES[t.dtype], t.shape) for t in specs]

    graph = onnx.helper.make_graph([], "g", value_infos(manifest.inputs), value_infos(manifest.outputs), [wpe])
    (path / "model.onnx").write_bytes(onnx.helper.make_model(graph).SerializeToString())
    make_manifest(target, {"model.onnx": sha256_file(path / "model.onnx")}, last_token).write(path)
    return path


# --- profiles and limits ----------------------------------------------------------------------------------------
def test_profiles_cover_prefill_with_empty_past_and_decode():
    manifest = make_manifest()
    limits = engine_limits(manifest, max_batch=4, max_prompt=16, max_context=64)
    prefill, decode = derive_profiles(manifest, limits)
    assert prefill["input_ids"] == ((1, 1), (2, 8), (4, 16))
    assert prefill["past_key_values.0.key_value"] == ((1, 0, 16), (2, 0, 16), (4, 0, 16))
    assert prefill["attention_mask"] == ((1, 1), (2, 8), (4, 16))  # past 0 + sequence
    assert decode["input_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode["past_key_values.1.key_value"] == ((1, 1, 16), (2, 32, 16), (4, 63, 16))
    assert decode["attention_mask"] == ((1, 2), (2, 33), (4, 64))  # past + 1, never beyond the context
    assert set(prefill) == set(decode) == set(manifest.input_names)
    assert profile_for(0) == PREFILL and profile_for(5) == DECODE


def test_mha_cache_profiles_keep_the_head_axis():
    manifest = make_manifest(multi_query=False)
    _, decode = derive_profiles(manifest, EngineLimits(max_batch=2, max_prompt=8, max_context=32))
    assert decode["past_key_values.0.key_value"] == ((1, 4, 1, 16), (1, 4, 16, 16), (2, 4, 31, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batch=9), "--max-batch 9 exceeds the bundle's batch range (max 8)"),
        (dict(max_context=65), "--max-context 65 must be in 2..64"),
        (dict(max_context=1), "--max-context 1 must be in 2..64 (a decode step needs one past token and one new one"),
        (dict(max_prompt=40, max_context=32), "--max-prompt 40 must be in 1..--max-context (32)"),
    ],
)
def test_limits_are_checked_against_the_manifest(kwargs, message):
    args = dict(max_batch=None, max_prompt=None, max_context=None) | kwargs
    with pytest.raises(BigCodeError) as err:
        engine_limits(make_manifest(), **args)
    assert message in str(err.value)


def test_defaults_come_from_the_manifest():
    assert engine_limits(make_manifest(), None, None, None) == EngineLimits(max_batch=8, max_prompt=32, max_context=64)


def test_limits_need_a_causal_lm_with_a_cache():
    manifest = make_manifest()
    manifest.kv_cache = None
    with pytest.raises(BigCodeError, match="needs a causal-lm bundle with a KV cache"):
        engine_limits(manifest, None, None, None)


def test_a_refused_input_shape_names_the_tensor_shape_and_range():
    profiles = [{"input_ids": [[1, 1], [2, 8], [4, 16]]}, {"input_ids": [[1, 1], [2, 1], [4, 1]]}]
    message = input_shape_error("input_ids", (8, 1), DECODE, profiles)
    assert message.startswith("TensorRT refused shape (8, 1) for input input_ids: the engine's decode profile allows")
    assert "(1, 1) to (4, 1)" in message and "\n" not in message
    assert "has no range recorded" in input_shape_error("other", (1,), PREFILL, profiles)


# --- metadata, paths, I/O ---------------------------------------------------------------------------------------
def test_engine_metadata_compatibility_names_the_mismatch(tmp_path):
    limits = {"max_batch": 4, "max_prompt": 8, "max_context": 32}
    meta = EngineMetadata("10.13.0", "NVIDIA H100", [9, 0], {"model.onnx": "abc"}, [], limits, 1.0)
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
    path.write_text(json.dumps(meta.__dict__ | {"limits": {"max_batch": 4}}))
    with pytest.raises(BigCodeError, match="records no integer limits"):
        EngineMetadata.read(path)


def test_engine_paths_and_io_mapping():
    assert engine_dir("b", (9, 0), "10.13.0").as_posix() == "b/engine/sm90-trt10.13.0"
    assert engine_dir("b", (9, 0), "10.13.0", "NVIDIA H200").as_posix() == "b/engine/sm90-nvidia-h200-trt10.13.0"
    bindings = {b.name: b for b in io_bindings(make_manifest())}
    assert bindings["input_ids"] == TensorBinding("input_ids", "input", "INT64", np.dtype(np.int64))
    assert bindings["present.0.key_value"].trt_dtype == "HALF" and bindings["logits"].mode == "output"
    assert bindings["past_key_values.1.key_value"].dtype == np.float16


def test_engine_io_is_checked_against_the_manifest():
    manifest = make_manifest()
    found = {b.name: (b.mode, b.trt_dtype) for b in io_bindings(manifest)}
    check_engine_io(found, manifest)
    found["logits"] = ("output", "FLOAT")
    del found["present.1.key_value"]
    found["extra"] = ("output", "HALF")
    with pytest.raises(BigCodeError) as err:
        check_engine_io(found, manifest, what="the engine x.plan")
    message = str(err.value)
    assert message.startswith("the engine x.plan's I/O does not match the manifest (present.1.key_value missing; ")
    assert "unexpected output extra" in message and "logits is output FLOAT, the manifest says output HALF" in message
    assert "rebuild the engine" in message and "\n" not in message


# --- the target: refused without an explicit --lower-to ---------------------------------------------------------
def test_build_engine_refuses_a_bundle_of_another_target_before_needing_tensorrt(tmp_path):
    portable = write_bundle(tmp_path / "b", "portable")
    for build in (build_engine, build_engine_for):
        with pytest.raises(BigCodeError) as err:
            build(portable, progress=quiet)
        assert str(err.value).startswith(f"{portable} targets portable, not tensorrt: build-engine takes a tensorrt")
        assert "--lower-to OUT_DIR" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no sibling <bundle>-tensorrt appeared


def test_lower_to_is_refused_for_a_tensorrt_bundle(tmp_path):
    bundle = write_bundle(tmp_path / "t", "tensorrt")
    with pytest.raises(BigCodeError, match="already targets tensorrt: drop --lower-to"):
        build_engine_for(bundle, lower_to=tmp_path / "out", progress=quiet)


def test_cli_build_engine_on_a_portable_bundle_says_what_to_do(tmp_path):
    portable = write_bundle(tmp_path / "b", "portable")
    result = CliRunner().invoke(main, ["build-engine", str(portable)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {portable} targets portable, not tensorrt")


# --- without TensorRT: one line ---------------------------------------------------------------------------------
@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the guard is not what runs")
def test_without_tensorrt_build_and_backend_say_so_in_one_line(tmp_path):
    bundle = write_bundle(tmp_path / "t", "tensorrt")
    result = CliRunner().invoke(main, ["build-engine", str(bundle), "--max-batch", "4"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {NOT_AVAILABLE}"
    from bigcode_deploy.runtime.backends import open_backend

    with pytest.raises(BackendUnavailable) as err:
        with open_backend(Bundle.open(bundle), "tensorrt"):
            pass
    assert str(err.value) == NOT_AVAILABLE


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed: the guard is not what runs")
def test_without_tensorrt_nothing_is_lowered(tmp_path):
    portable = write_bundle(tmp_path / "b", "portable")
    with pytest.raises(BackendUnavailable, match="TensorRT is not available"):
        build_engine_for(portable, lower_to=tmp_path / "lowered", progress=quiet)
    assert not (tmp_path / "lowered").exists()


def test_without_cuda_python_the_error_is_one_line(monkeypatch):
    cuda.cudart.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda", None)  # makes `import cuda...` raise ImportError
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    try:
        with pytest.raises(BackendUnavailable) as err:
            cuda.cudart()
    finally:
        cuda.cudart.cache_clear()
    message = str(err.value)
    assert message.startswith("CUDA is not available to the runtime: `from cuda.bindings import runtime` failed (")
    assert "install the `tensorrt` extra (cuda-python)" in message and "\n" not in message


# --- runtime/cuda.py: plans on the CPU, and the calls against a fake cudart backed by host memory ----------------
def test_row_gather_plan_copies_each_kept_row_and_merges_runs():
    assert cuda.row_gather_plan([0, 1, 2], batch=3, row_bytes=10) == [cuda.Copy(0, 0, 30)]
    assert cuda.row_gather_plan([1, 2], batch=4, row_bytes=10) == [cuda.Copy(10, 0, 20)]
    assert cuda.row_gather_plan(np.array([2, 0]), batch=3, row_bytes=8) == [cuda.Copy(16, 0, 8), cuda.Copy(0, 8, 8)]
    assert cuda.row_gather_plan([0, 2, 3], batch=4, row_bytes=4) == [cuda.Copy(0, 0, 4), cuda.Copy(8, 4, 8)]
    assert cuda.row_gather_plan([1, 1], batch=2, row_bytes=4) == [cuda.Copy(4, 0, 4), cuda.Copy(4, 4, 4)]
    assert cuda.row_gather_plan([0, 1], batch=2, row_bytes=0) == []  # an empty cache: nothing to copy
    with pytest.raises(BigCodeError, match=r"rows \[3, -1\] are outside the batch \(0\.\.2\)"):
        cuda.row_gather_plan([0, 3, -1], batch=3, row_bytes=4)


def test_last_position_layout_and_dummy_addresses():
    assert cuda.last_position_layout((2, 5, 7), itemsize=2) == cuda.Layout2D(offset=56, pitch=70, width=14, height=2)
    assert cuda.last_position_layout((3, 1, 4), itemsize=4) == cuda.Layout2D(offset=0, pitch=16, width=16, height=3)
    with pytest.raises(BigCodeError, match="needs a \\(batch, sequence, vocab\\) tensor"):
        cuda.last_position_layout((2, 7), itemsize=4)
    addresses = cuda.dummy_addresses(0x10000, ["a", "b", "c"])
    assert len(set(addresses.values())) == 3 and all(a and a % cuda.ALIGNMENT == 0 for a in addresses.values())
    with pytest.raises(BigCodeError):
        cuda.dummy_addresses(0, ["a"])


class FakeCudart(types.SimpleNamespace):
    """cudart's calling convention over host memory: (err, *values) tuples, pointers as ints, memcpy by memmove."""

    def __init__(self, fail: str | None = None):
        kinds = types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3, cudaMemcpyDefault=4
        )
        super().__init__(
            cudaMemcpyKind=kinds, cudaStreamNonBlocking=1, fail=fail, blocks={}, calls=[], streams=[], next_stream=100
        )

    def _result(self, name, *values):
        self.calls.append(name)
        return (2, None) if name == self.fail else (0, *values)

    def cudaGetErrorName(self, err):
        return (0, b"cudaErrorMemoryAllocation")

    def cudaGetErrorString(self, err):
        return (0, b"out of memory")

    def cudaMalloc(self, size):
        block = ctypes.create_string_buffer(size + cuda.ALIGNMENT)  # cudaMalloc's addresses are 256-byte aligned
        address = -(-ctypes.addressof(block) // cuda.ALIGNMENT) * cuda.ALIGNMENT
        self.blocks[address] = block
        return self._result("cudaMalloc", address)

    def cudaFree(self, ptr):
        del self.blocks[ptr]
        return self._result("cudaFree")[:1]

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.streams.append(("cudaMemcpyAsync", stream))
        ctypes.memmove(dst, src, count)
        return self._result("cudaMemcpyAsync")[:1]

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.streams.append(("cudaMemcpy2DAsync", stream))
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        return self._result("cudaMemcpy2DAsync")[:1]

    def cudaStreamCreateWithFlags(self, flags):
        self.next_stream += 1  # a distinct handle per stream, so a test can tell which stream a call used
        return self._result("cudaStreamCreateWithFlags", self.next_stream)

    def cudaStreamSynchronize(self, stream):
        return self._result("cudaStreamSynchronize")[:1]

    def cudaStreamDestroy(self, stream):
        return self._result("cudaStreamDestroy")[:1]


@pytest.fixture
def fake_cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    return fake


def test_device_buffers_copies_and_row_gather_move_the_right_bytes(fake_cudart):
    stream = cuda.Stream()
    cache = np.arange(4 * 3 * 6, dtype=np.float16).reshape(4, 3, 6)  # (batch, past, 2 * head_dim)
    device = cuda.to_device(cache, stream)
    assert device.shape == (4, 3, 6) and device.dtype == np.float16 and device.nbytes == cache.nbytes
    kept = cuda.gather_rows(device, np.array([3, 1, 2]), stream)
    np.testing.assert_array_equal(cuda.to_host(kept, stream), cache[[3, 1, 2]])
    logits = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    last = cuda.last_position_to_host(cuda.to_device(logits, stream), stream)
    np.testing.assert_array_equal(last, logits[:, -1])
    ids = cuda.to_device(np.array([[1, 2]]), stream, dtype=np.int64)
    assert cuda.to_host(ids, stream).dtype == np.int64
    empty = cuda.DeviceBuffer((2, 0, 6), np.float16)
    assert empty.ptr == 0 and empty.nbytes == 0 and cuda.gather_rows(empty, [1], stream).shape == (1, 0, 6)
    allocated = len(fake_cudart.blocks)
    kept.close()
    kept.close()  # idempotent
    assert len(fake_cudart.blocks) == allocated - 1
    stream.close()
    assert fake_cudart.calls[-2:] == ["cudaStreamSynchronize", "cudaStreamDestroy"]


def test_every_failed_cuda_call_is_named(monkeypatch):
    fake = FakeCudart(fail="cudaMalloc")
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    with pytest.raises(cuda.CudaError) as err:
        cuda.DeviceBuffer((1024,), np.float32)
    assert str(err.value) == "cudaMalloc failed: cudaErrorMemoryAllocation (out of memory)"
    assert cuda.call("cudaGetDevice", (0, 3)) == 3 and cuda.call("cudaFree", (0,)) is None
    assert cuda.call("x", (0, 1, 2)) == (1, 2)


# --- on a GPU ---------------------------------------------------------------------------------------------------
def _cuda_device() -> bool:
    try:
        return cuda.device_count() > 0
    except BackendUnavailable:
        return False


@pytest.mark.skipif(not _cuda_device(), reason="needs cuda-python and a CUDA device (not on this machine)")
def test_device_copies_on_a_gpu():
    name, capability = cuda.device_info()
    assert name and capability[0] >= 3
    with cuda.Stream() as stream:
        cache = np.arange(3 * 4 * 8, dtype=np.float16).reshape(3, 4, 8)
        device = cuda.to_device(cache, stream)
        assert device.ptr % cuda.ALIGNMENT == 0
        np.testing.assert_array_equal(cuda.to_host(cuda.gather_rows(device, [2, 0], stream), stream), cache[[2, 0]])
        np.testing.assert_array_equal(cuda.last_position_to_host(device, stream), cache[:, -1])


@pytest.mark.skipif(
    not HAVE_TENSORRT or not _cuda_device(), reason="needs tensorrt, cuda-python and a CUDA device (not here)"
)
def test_engine_build_and_parity_on_gpu(tmp_path):
    from bigcode_deploy.exporter.export import export_bundle
    from bigcode_deploy.runtime.verify import verify_bundle
    from tests.helpers import make_hf_model

    make_hf_model("causal-lm", seed=4).save_pretrained(tmp_path / "ckpt")
    portable = export_bundle(tmp_path / "ckpt", tmp_path / "fp16", dtype="fp16", check=False, progress=quiet)
    plan = build_engine_for(portable, lower_to=tmp_path / "trt", max_batch=4, max_prompt=16, max_context=64,
                            progress=quiet)  # fmt: skip
    assert plan.is_file() and plan.is_relative_to(tmp_path / "trt")
    report = verify_bundle(tmp_path / "trt", backend="tensorrt")
    assert report.ok, report.table()


# --- the backend against a fake TensorRT and the fake cudart (no GPU): binding, checks, errors -------------------
class FakeEngine:
    """A deserialized engine over a manifest's I/O: shapes are inferred as the graph would, outputs filled with
    known values (logits[b, t, v] = 1000 b + 10 t + v % 10, presents = layer index)."""

    def __init__(self, trt, manifest, profiles, io=None, context=True, num_profiles=2):
        self.trt, self.manifest, self.profiles = trt, manifest, profiles
        self.io = io or {b.name: (b.mode, b.trt_dtype) for b in io_bindings(manifest)}
        self.make_context, self.num_optimization_profiles = context, num_profiles

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if self.io[name][0] == "input" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.io[name][1])

    def create_execution_context(self):
        return FakeContext(self) if self.make_context else None


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses, self.executed = engine, 0, {}, {}, []
        self.streams = []  # (call, stream handle) of every call that takes a stream

    def set_optimization_profile_async(self, index, stream):
        self.streams.append(("set_optimization_profile_async", stream))
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[self.profile][name]
        if len(shape) != len(low) or not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        batch, seq = self.shapes["input_ids"]
        if name == "logits":
            positions = 1 if self.engine.manifest.logits_positions == "last" else seq
            return (batch, positions, self.engine.manifest.config["vocab_size"])
        past = self.shapes[name.replace("present", "past_key_values")]
        return (batch, past[1] + seq, past[2])

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        self.streams.append(("execute_async_v3", stream))
        self.executed.append(dict(self.addresses))
        for name in self.engine.manifest.output_names:
            shape = self.get_tensor_shape(name)
            if name == "logits":
                b, t, v = np.indices(shape)
                values = (1000 * b + 10 * t + v % 10).astype(np.float16)
            else:
                values = np.full(shape, int(name.split(".")[1]), dtype=np.float16)
            ctypes.memmove(self.addresses[name], values.ctypes.data, values.nbytes)
        return True


def fake_tensorrt(engine_factory):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine_factory(trt))
    trt.Runtime = lambda logger: runtime
    return trt


@pytest.fixture
def fake_engine_bundle(tmp_path, monkeypatch, fake_cudart):
    """Factory: a tensorrt bundle with an engine directory for the fake GPU ("Fake GPU", sm90) and TensorRT 10.99.0,
    and the fake TensorRT that loads it. last_token: a last-token-logits bundle; meta: engine.json fields to
    change; engine_limits: the limits the fake engine's profiles really have (default: engine.json's)."""
    from bigcode_deploy.runtime.tensorrt_build import write_engine

    fake_cudart.cudaGetDeviceCount = lambda: (0, 1)
    props = types.SimpleNamespace(name=b"Fake GPU\0\0", major=9, minor=0)
    fake_cudart.cudaGetDeviceProperties = lambda device: (0, props)

    def install(last_token=False, meta=None, engine_limits=None, **engine_kwargs):
        bundle = Bundle.open(write_bundle(tmp_path / "t", "tensorrt", last_token))
        manifest = bundle.manifest
        limits = EngineLimits(max_batch=4, max_prompt=8, max_context=32)
        profiles = derive_profiles(manifest, limits)
        record = EngineMetadata(
            "10.99.0", "Fake GPU", [9, 0], dict(manifest.graph.sha256),
            [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles], limits.__dict__, 0.0,
        )  # fmt: skip
        for field_name, value in (meta or {}).items():
            setattr(record, field_name, value)
        model = "Fake GPU" if record.hardware_compatibility == "NONE" else None  # default engines: per GPU model
        write_engine(engine_dir(bundle.path, (9, 0), "10.99.0", model), b"plan", record)
        if engine_limits is not None:
            profiles = derive_profiles(manifest, engine_limits)
        factory = engine_kwargs.pop("factory", None) or (
            lambda trt: FakeEngine(trt, manifest, profiles, **engine_kwargs)
        )
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(factory))
        return bundle

    return install


def test_backend_binds_distinct_dummies_steps_and_selects_rows(fake_engine_bundle, fake_cudart):
    from bigcode_deploy.runtime.tensorrt import TensorRTBackend

    bundle = fake_engine_bundle()
    with TensorRTBackend(bundle) as backend:
        ids = np.array([[5, 6, 7], [8, 9, 1]])
        mask = np.ones_like(ids)
        logits, cache = backend.step(ids, mask, np.cumsum(mask, 1) - 1, backend.empty_cache(2))
        bound = backend.context.executed[0]
        dummies = [bound[name] for name in bundle.past_names()]
        assert all(dummies) and len(set(dummies)) == len(dummies)  # non-null, one per empty input
        assert not set(dummies) & {bound[name] for name in bound if name not in bundle.past_names()}
        assert logits.dtype == np.float32 and logits.shape == (2, 100)
        assert logits[1, 3] == 1000 + 20 + 3  # row 1, last position (t = 2)
        assert [c.shape for c in cache] == [(2, 3, 16), (2, 3, 16)]
        kept = backend.select_rows(cache, np.array([1]))
        assert kept[1].shape == (1, 3, 16) and np.all(cuda.to_host(kept[1], backend.stream) == 1)
        logits, cache = backend.step(np.array([[4]]), np.ones((1, 4), np.int64), np.array([[3]]), kept)
        assert backend.context.profile == DECODE and [c.shape for c in cache] == [(1, 4, 16), (1, 4, 16)]
        executed = len(backend.context.executed)
        with pytest.raises(BigCodeError) as err:  # 9 new tokens: beyond --max-prompt 8, refused before TensorRT
            backend.step(np.ones((1, 9), np.int64), np.ones((1, 9), np.int64), np.ones((1, 9), np.int64),
                         backend.empty_cache(1))  # fmt: skip
        assert str(err.value) == (
            "the engine cannot run this step (a prompt of 9 tokens exceeds --max-prompt 8): rebuild it with larger "
            "limits (`bigcode-deploy build-engine`)"
        )
        assert len(backend.context.executed) == executed
        outputs = backend.run({"input_ids": ids, "attention_mask": mask, "position_ids": mask, **bundle.empty_past(2)})
        assert outputs["logits"].dtype == np.float32 and outputs["present.0.key_value"].shape == (2, 3, 16)
        # Point 1: every copy, profile switch and execution went on the backend's one stream.
        used = {stream for _, stream in fake_cudart.streams + backend.context.streams}
        assert used == {backend.stream.raw} and backend.stream.handle == backend.stream.raw
        calls = {call for call, _ in fake_cudart.streams + backend.context.streams}
        assert calls == {"cudaMemcpyAsync", "cudaMemcpy2DAsync", "set_optimization_profile_async", "execute_async_v3"}
        # Every bound address is 256-byte aligned; a misaligned one is refused before TensorRT sees it.
        assert all(a % cuda.ALIGNMENT == 0 for step in backend.context.executed for a in step.values())
        with pytest.raises(BigCodeError, match="the address 0x[0-9a-f]+ of tensor logits is not 256-byte aligned"):
            backend._bind("logits", backend.dummies["logits"] + 8)


@pytest.mark.parametrize(
    "ids_shape, past, message",
    [
        ((5, 1), 3, "batch 5 exceeds --max-batch 4"),
        ((1, 1), 32, "a context of 33 tokens exceeds --max-context 32"),
        ((1, 2), 3, "a cached step of 2 tokens: the decode profile takes one new token per step"),
    ],
)
def test_steps_beyond_the_engines_limits_are_refused_before_tensorrt(fake_engine_bundle, ids_shape, past, message):
    from bigcode_deploy.runtime.tensorrt import TensorRTBackend

    bundle = fake_engine_bundle()
    with TensorRTBackend(bundle) as backend:
        batch, seq = ids_shape
        cache = [cuda.DeviceBuffer((batch, past, 16), np.float16) for _ in bundle.past_names()]
        ones = np.ones(ids_shape, np.int64)
        with pytest.raises(BigCodeError) as err:
            backend.step(ones, np.ones((batch, past + seq), np.int64), ones, cache)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert backend.context.executed == []


def test_a_shape_the_engines_profile_refuses_names_tensor_and_range(fake_engine_bundle):
    """set_input_shape returns False (the binding does not raise): the message names the tensor and the range."""
    from bigcode_deploy.runtime.tensorrt import TensorRTBackend

    # engine.json says batch 4, the engine's profiles really stop at 2: TensorRT is what refuses batch 3.
    bundle = fake_engine_bundle(engine_limits=EngineLimits(max_batch=2, max_prompt=8, max_context=32))
    with TensorRTBackend(bundle) as backend:
        ones = np.ones((3, 2), np.int64)
        with pytest.raises(BigCodeError) as err:
            backend.step(ones, ones, ones, backend.empty_cache(3))
    assert str(err.value).startswith("TensorRT refused shape (3, 2) for input input_ids: the engine's prefill")
    assert "allows (1, 1) to (4, 8)" in str(err.value)  # the range engine.json records


def test_last_token_logits_engine_steps(fake_engine_bundle):
    """A tensorrt bundle (always last-token logits): logits (batch, 1, vocab) come back as each row's (B, vocab)."""
    from bigcode_deploy.runtime.tensorrt import TensorRTBackend

    bundle = fake_engine_bundle(last_token=True)
    assert bundle.manifest.output("logits").shape == ["batch", 1, 100]
    with TensorRTBackend(bundle) as backend:
        ids = np.array([[5, 6, 7], [8, 9, 1]])
        logits, cache = backend.step(ids, np.ones_like(ids), np.ones_like(ids), backend.empty_cache(2))
        assert logits.shape == (2, 100) and logits[1, 3] == 1000 + 3  # row 1, its one (last) position t = 0
        assert [c.shape for c in cache] == [(2, 3, 16), (2, 3, 16)]


@pytest.mark.parametrize(
    "engine, message",
    [
        (dict(factory=lambda trt: None), "TensorRT could not deserialize"),
        (dict(context=False), "TensorRT could not create an execution context"),
        (dict(io={"input_ids": ("input", "INT32")}), "I/O does not match the manifest"),
        (dict(num_profiles=1), "has 1 optimization profiles where 2 (prefill, decode) are needed"),
        (
            dict(meta={"gpu_name": "Other GPU"}),
            "the engine was built on Other GPU and this GPU is Fake GPU: TensorRT promises a default engine only on",
        ),
        (dict(meta={"hardware_compatibility": "AMPERE_PLUS"}), "records hardware compatibility 'AMPERE_PLUS'"),
    ],
)
def test_backend_refuses_an_unloadable_engine_in_one_line(fake_engine_bundle, engine, message):
    from bigcode_deploy.runtime.tensorrt import TensorRTBackend

    bundle = fake_engine_bundle(**engine)
    with pytest.raises(BigCodeError) as err:
        TensorRTBackend(bundle).__enter__()
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "build-engine" in str(err.value)


# --- the builder against a fake TensorRT (no GPU): timing cache, profiles, hardware level, metadata ---------------
class FakeBuild:
    """What one fake build saw and how TensorRT behaves: accept_cache (set_timing_cache's result), give_cache
    (get_timing_cache returns one), refuse_profile (the index add_optimization_profile refuses with -1),
    output_shapes (the parsed network's output dims by name)."""

    def __init__(self, manifest, **behaviour):
        self.manifest = manifest
        self.accept_cache, self.give_cache, self.refuse_profile = True, True, None
        self.output_shapes: dict[str, tuple] = {}
        self.__dict__.update(behaviour)
        self.loggers, self.cache_read, self.config = 0, None, None


def fake_build_tensorrt(build: FakeBuild, version="10.99.0", same_cc_level=True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, level):
            build.loggers += 1

    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    if same_cc_level:
        trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", SAME_COMPUTE_CAPABILITY="SAME_CC")

    def tensor(spec, trt_dtype):
        shape = build.output_shapes.get(spec.name, tuple(d if isinstance(d, int) else -1 for d in spec.shape))
        return types.SimpleNamespace(name=spec.name, dtype=types.SimpleNamespace(name=trt_dtype), shape=shape)

    bindings = {b.name: b.trt_dtype for b in io_bindings(build.manifest)}
    inputs = [tensor(spec, bindings[spec.name]) for spec in build.manifest.inputs]
    outputs = [tensor(spec, bindings[spec.name]) for spec in build.manifest.outputs]
    network = types.SimpleNamespace(
        num_inputs=len(inputs), get_input=inputs.__getitem__, num_outputs=len(outputs), get_output=outputs.__getitem__
    )

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None
            build.config = self

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def create_timing_cache(self, data):
            build.cache_read = bytes(data)
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache, self.ignore_mismatch = cache, ignore_mismatch
            return build.accept_cache

        def get_timing_cache(self):
            return self.cache if build.give_cache else None

        def add_optimization_profile(self, profile):
            if len(self.profiles) == build.refuse_profile:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(shapes={})
            profile.set_shape = lambda name, low, opt, high: profile.shapes.__setitem__(name, (low, opt, high))
            return profile

        def build_serialized_network(self, network, config):
            return b"the plan"

    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True)
    return trt


@pytest.fixture
def fake_builder(tmp_path, monkeypatch, fake_cudart):
    """Factory: (a tensorrt bundle, its FakeBuild) with a fake TensorRT installed for the fake GPU "Fake GPU" sm90."""
    fake_cudart.cudaGetDeviceCount = lambda: (0, 1)
    props = types.SimpleNamespace(name=b"Fake GPU\0", major=9, minor=0)
    fake_cudart.cudaGetDeviceProperties = lambda device: (0, props)
    bundle = Bundle.open(write_bundle(tmp_path / "t", "tensorrt", last_token=True))

    def install(version="10.99.0", same_cc_level=True, **behaviour):
        build = FakeBuild(bundle.manifest, **behaviour)
        monkeypatch.setitem(sys.modules, "tensorrt", fake_build_tensorrt(build, version, same_cc_level))
        return bundle.path, build

    return install


def build(bundle_path, **kwargs):
    return build_engine(bundle_path, max_batch=4, max_prompt=8, max_context=32, progress=quiet, **kwargs)


def test_build_writes_plan_metadata_and_a_timing_cache_keyed_by_gpu_and_version(fake_builder, tmp_path):
    bundle_path, state = fake_builder()
    caches = tmp_path / "caches"
    plan = build(bundle_path, timing_cache=caches)
    assert plan.read_bytes() == b"the plan"
    meta = EngineMetadata.read(plan.parent / "engine.json")
    assert (meta.gpu_name, meta.compute_capability, meta.hardware_compatibility) == ("Fake GPU", [9, 0], "NONE")
    assert plan.parent.name == "sm90-fake-gpu-trt10.99.0"  # a default engine: its GPU model's own directory
    assert meta.profiles[1]["attention_mask"] == [[1, 2], [2, 17], [4, 32]]  # decode: past + 1 within the context
    cache = caches / "sm90-fake-gpu-trt10.99.0.timing-cache"
    assert sorted(p.name for p in caches.iterdir()) == [cache.name]  # nothing half-written beside it
    assert state.cache_read == b"" and cache.read_bytes() == b"+timings" and state.config.ignore_mismatch is False
    assert [p.shapes["input_ids"] for p in state.config.profiles] == [
        ((1, 1), (2, 4), (4, 8)),
        ((1, 1), (2, 1), (4, 1)),
    ]
    build(bundle_path, timing_cache=caches)  # the second build reads the first one's timings
    assert state.cache_read == b"+timings" and cache.read_bytes() == b"+timings+timings"
    assert state.loggers == 1  # one trt.Logger for the process, not one per build
    assert not hasattr(state.config, "hardware_compatibility_level") and not hasattr(
        state.config, "profiling_verbosity"
    )
    assert timing_cache_file("d", "NVIDIA H100 80GB HBM3", (9, 0), "10.13.0").as_posix() == (
        "d/sm90-nvidia-h100-80gb-hbm3-trt10.13.0.timing-cache"
    )


def test_build_for_the_same_compute_capability_records_the_level(fake_builder):
    bundle_path, state = fake_builder()
    plan = build(bundle_path, same_compute_capability=True, detailed_profile=True)
    assert state.config.hardware_compatibility_level == "SAME_CC" and state.config.profiling_verbosity == "DETAILED"
    meta = EngineMetadata.read(plan.parent / "engine.json")
    assert meta.hardware_compatibility == "SAME_COMPUTE_CAPABILITY"
    assert plan.parent.name == "sm90-trt10.99.0"  # shared by every GPU of the architecture
    check_compatible(meta, "10.99.0", (9, 0), meta.graph_sha256, "Another GPU of sm90")  # promised: loads
    bundle_path, _ = fake_builder(same_cc_level=False)
    with pytest.raises(BigCodeError, match="TensorRT 10.99.0 has no HardwareCompatibilityLevel.SAME_COMPUTE_CAP"):
        build(bundle_path, same_compute_capability=True)


@pytest.mark.parametrize(
    "behaviour, message",
    [
        (dict(accept_cache=False), "TensorRT refused the timing cache "),
        (dict(refuse_profile=1), "TensorRT refused the decode optimization profile (index -1, expected 1): input_ids"),
        (
            dict(output_shapes={"logits": (-1, 5, 100)}),
            "the parsed network's output shapes differ from the manifest (logits is (-1, 5, 100), the manifest says "
            "('batch', 1, 100))",
        ),
        (dict(version="10.8.0"), None),  # opset 18 parses on every 10.x
        (dict(version="9.2.0"), "TensorRT version '9.2.0' is not 10.x or newer"),
    ],
)
def test_build_refuses_what_tensorrt_refuses_in_one_line(fake_builder, tmp_path, behaviour, message):
    bundle_path, _ = fake_builder(**behaviour)
    if message is None:
        assert build(bundle_path).is_file()
        return
    with pytest.raises(BigCodeError) as err:
        build(bundle_path, timing_cache=tmp_path / "caches")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (bundle_path / "engine").exists()


def test_a_missing_timing_cache_after_the_build_is_said_not_crashed(fake_builder, tmp_path):
    bundle_path, _ = fake_builder(give_cache=False)
    said = []
    plan = build_engine(bundle_path, max_batch=4, timing_cache=tmp_path / "caches", progress=said.append)
    assert plan.is_file() and not (tmp_path / "caches").exists()
    assert any(line.startswith("TensorRT returned no timing cache after the build:") for line in said)


def test_engine_metadata_of_older_builds_reads_as_this_gpu_model_only(tmp_path):
    limits = {"max_batch": 4, "max_prompt": 8, "max_context": 32}
    meta = EngineMetadata("10.13.0", "NVIDIA H100", [9, 0], {"model.onnx": "abc"}, [], limits, 1.0)
    raw = dict(meta.__dict__)
    del raw["hardware_compatibility"]  # an engine.json written before the field existed
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(raw))
    assert EngineMetadata.read(path).hardware_compatibility == "NONE"
    check_compatible(meta, "10.13.0", (9, 0), {"model.onnx": "abc"}, "NVIDIA H100")
    with pytest.raises(BigCodeError, match="built on NVIDIA H100 and this GPU is NVIDIA H200"):
        check_compatible(meta, "10.13.0", (9, 0), {"model.onnx": "abc"}, "NVIDIA H200")


# --- scripts/gpu_check.py's TensorRT part: "not checked" with the reason, never an abort ---------------------------
def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[2] / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_says_not_checked_for_a_stub_wheel_or_no_device(monkeypatch, fake_cudart, capsys, tmp_path):
    gpu_check = _gpu_check_module()
    stub = types.ModuleType("tensorrt")  # what a stub wheel's failing import can leave: anything may raise

    def broken(name):
        raise RuntimeError("the tensorrt stub could not download its libraries\nmore lines")

    stub.__getattr__ = broken
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.setattr("bigcode_deploy.runtime.tensorrt_engine.require_tensorrt", lambda: stub.__version__)
    assert gpu_check.tensorrt_check(tmp_path / "b", tmp_path / "trt") is True
    assert capsys.readouterr().out == "TensorRT: not checked: the tensorrt stub could not download its libraries\n"
    monkeypatch.undo()
    fake_cudart.cudaGetDeviceCount = lambda: (0, 0)
    monkeypatch.setattr(cuda, "cudart", lambda: fake_cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert gpu_check.tensorrt_check(tmp_path / "b", tmp_path / "trt") is True
    out = capsys.readouterr().out
    assert (
        out.startswith("TensorRT: not checked: TensorRT is installed but no CUDA device is visible")
        and out.count("\n") == 1
    )
    assert not (tmp_path / "trt").exists()


def test_the_manifest_records_the_attention_scale_form_and_refuses_others():
    manifest = make_manifest()
    assert manifest.attention_scale == "softmax-unscale"  # the export's form, also for manifests written before
    derived = manifest.derive(target="tensorrt", passes=[], custom_ops_used=[], graph=manifest.graph,
                              attention_scale="query")  # fmt: skip
    assert Manifest.from_json(derived.to_json()).attention_scale == "query"
    raw = derived.to_json()
    del raw["attention_scale"]
    assert Manifest.from_json(raw).attention_scale == "softmax-unscale"
    raw["attention_scale"] = "on-k"
    with pytest.raises(BigCodeError, match="attention_scale is 'on-k', not one of softmax-unscale, query"):
        Manifest.from_json(raw)
