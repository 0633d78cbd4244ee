"""The C ABI, built with the machine's compiler: error codes and messages, the C++ example, and memory."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.progress import quiet

ROOT = Path(__file__).resolve().parents[2]
STATUS = {
    "OK": 0,
    "INVALID_ARGUMENT": 1,
    "BAD_BUNDLE": 2,
    "CONTEXT_OVERFLOW": 3,
    "BACKEND_UNAVAILABLE": 4,
    "CANCELLED": 5,
    "STATE": 6,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(library dir, bundle of the default model, C checks binary, C++ example binary)."""
    from bigcode_deploy.runtime.capi_build import HEADER, build

    root = tmp_path_factory.mktemp("capi")
    library = build(root / "lib")
    bundle = export_bundle(None, root / "bundle", check=False, progress=quiet)
    checks = root / "capi_checks"
    subprocess.run(
        [
            "cc",
            "-std=c11",
            "-Wall",
            "-Werror",
            f"-I{HEADER.parent}",
            str(ROOT / "tests" / "capi" / "capi_checks.c"),
            f"-L{library.parent}",
            "-lbigcode_runtime",
            f"-Wl,-rpath,{library.parent}",
            "-o",
            str(checks),
        ],
        check=True,
    )
    example = None
    if shutil.which("cmake"):
        subprocess.run(
            [
                "cmake",
                "-S",
                str(ROOT / "examples" / "cpp"),
                "-B",
                str(root / "example"),
                f"-DBIGCODE_RUNTIME_DIR={library.parent}",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["cmake", "--build", str(root / "example")], check=True, capture_output=True)
        example = root / "example" / "bigcode_generate"
    return library, bundle, checks, example


def test_error_paths_return_documented_codes_and_messages(built):
    _, bundle, checks, _ = built
    config = json.loads((bundle / "manifest.json").read_text())["config"]
    result = subprocess.run([str(checks), str(bundle)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    got = {}
    for line in result.stdout.splitlines():
        if line.startswith("CHECK "):
            _, name, status, *message = line.split(" ")
            got[name] = (int(status), " ".join(message))
    expected = {
        "open_missing": ("BAD_BUNDLE", "manifest.json is missing"),
        "open_null_path": ("INVALID_ARGUMENT", "path is NULL"),
        "open_tensorrt": ("BACKEND_UNAVAILABLE", "TensorRT is not available"),
        "open_bad_backend": ("INVALID_ARGUMENT", "unknown backend 'nope'"),
        "open": ("OK", ""),
        "info_small_buffer": ("INVALID_ARGUMENT", "buffer too small"),
        "generate_before_prefill": ("STATE", "needs a prefill first"),
        "prefill_out_of_vocab": ("INVALID_ARGUMENT", "token id 999999 is outside the vocabulary"),
        "logits_small_buffer": ("INVALID_ARGUMENT", f"out must hold {config['vocab_size']} floats"),
        "logits": ("OK", ""),
        "context_overflow": ("CONTEXT_OVERFLOW", f"exceed the model's context of {config['n_positions']} positions"),
        "cancel_by_callback": ("CANCELLED", "cancelled by the token callback"),
        "use_after_close": ("STATE", "not an open handle"),
    }
    for name, (status, message) in expected.items():
        assert got[name][0] == STATUS[status], (name, got[name])
        assert message in got[name][1], (name, got[name])
    info = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("INFO "))[5:])
    assert info["task"] == "causal-lm" and info["vocab_size"] == config["vocab_size"] and info["backend"] == "ort"


def test_hundred_sessions_do_not_grow_memory(built):
    _, bundle, checks, _ = built
    result = subprocess.run([str(checks), str(bundle)], capture_output=True, text=True, timeout=300)
    before, after = (
        int(v) for v in next(line for line in result.stdout.splitlines() if line.startswith("RSS ")).split()[1:]
    )
    # Bound: 90 sessions (each: create, prefill, 8 tokens, close) may grow RSS by at most 8 MB (~90 kB each);
    # measured here: ~20 kB in all.
    assert after - before < 8 * 1024, (before, after)


@pytest.mark.parametrize(
    "extra, sampling", [([], {}), (["--temperature", "0.9", "--seed", "7"], {"temperature": 0.9, "seed": 7})]
)
def test_cpp_example_tokens_equal_python_runtime(built, extra, sampling):
    _, bundle, _, example = built
    if example is None:
        pytest.skip("cmake is not installed: the C++ example cannot be built here")
    result = subprocess.run(
        [str(example), str(bundle), "--ids", "5,6,7", "--max-new-tokens", "12", "--print-ids", "1", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    tokens = [int(t) for t in result.stdout.strip().split(",")]
    with open_generator(bundle) as g:
        expected = g.generate([[5, 6, 7]], max_new_tokens=12, **sampling)[0]
    assert tokens == expected


def test_cpp_example_streams_text(built):
    _, bundle, _, example = built
    if example is None:
        pytest.skip("cmake is not installed: the C++ example cannot be built here")
    result = subprocess.run(
        [str(example), str(bundle), "--prompt", "def add(a, b):", "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open_generator(bundle) as g:
        pieces, _ = g.stream_text("def add(a, b):", max_new_tokens=16)
        expected = "".join(pieces)
    assert result.stdout == "def add(a, b):" + expected + "\n"
