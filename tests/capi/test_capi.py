"""The C ABI, built with the machine's compiler: error codes and messages, the C++ example, and memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.runtime.verify import verify_bundle
from bigcode_deploy.runtime.version import __version__
from tests.capi.build import build_program

ROOT = Path(__file__).resolve().parents[2]
STATUS = {
    "OK": 0,
    "INVALID_ARGUMENT": 1,
    "BAD_BUNDLE": 2,
    "CONTEXT_OVERFLOW": 3,
    "BACKEND_UNAVAILABLE": 4,
    "CANCELLED": 5,
    "STATE": 6,
    "INTERNAL": 7,
    "RUNTIME_UNAVAILABLE": 8,
}


def checks_output(stdout: str) -> dict[str, tuple[int, str]]:
    """{check name: (status, message)} from capi_checks' "CHECK name status message" lines."""
    got = {}
    for line in stdout.splitlines():
        if line.startswith("CHECK "):
            _, name, status, *message = line.split(" ")
            got[name] = (int(status), " ".join(message))
    return got


def value(stdout: str, key: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(key + " "))[len(key) + 1 :]


@pytest.fixture(scope="module")
def broken_install(tmp_path_factory):
    """An environment whose embedded runtime cannot start: a `bigcode_deploy` that raises on import, first on the
    path (as a moved virtual environment or a broken install would fail to import it)."""
    fake = tmp_path_factory.mktemp("broken") / "bigcode_deploy"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("deliberately broken install")\n')
    return {**os.environ, "BIGCODE_RUNTIME_PYTHONPATH": str(fake.parent)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(library dir, bundle of the default model, C checks binary, C++ example binary)."""
    root = tmp_path_factory.mktemp("capi")
    library, checks = build_program(root, "capi_checks.c")
    bundle = export_bundle(None, root / "bundle", check=False, progress=quiet)
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
    got = checks_output(result.stdout)
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
        "step_wrong_count": ("INVALID_ARGUMENT", "one token per active row (1), got 2"),
        "step_out_of_vocab": ("INVALID_ARGUMENT", "token id 999999 is outside the vocabulary"),
        "logits_after_failed_steps": ("OK", ""),
        "use_after_close": ("STATE", "not an open handle"),
        # A closed session's handle never reaches the session created after it (which reused its slot).
        "create_a": ("OK", ""),
        "create_after_close": ("OK", ""),
        "stale_prefill": ("STATE", "not an open handle"),
        "stale_cancel": ("STATE", "not an open handle"),
        "newer_prefill": ("OK", ""),
        "newer_step": ("OK", ""),
        "bundle_as_session": ("STATE", "not an open handle"),
        # A session used after its bundle was closed.
        "orphan_create": ("OK", ""),
        "orphan_prefill": ("OK", ""),
        "orphan_prefill_after_bundle_close": ("STATE", "the session's bundle was closed"),
        "orphan_generate_after_bundle_close": ("STATE", "the session's bundle was closed"),
        "orphan_step_after_bundle_close": ("STATE", "the session's bundle was closed"),
        "info_after_bundle_close": ("STATE", "not an open handle"),
        "create_after_bundle_close": ("STATE", "not an open handle"),
        "orphan_after_close": ("STATE", "not an open handle"),
    }
    for name, (status, message) in expected.items():
        assert got[name][0] == STATUS[status], (name, got[name])
        assert message in got[name][1], (name, got[name])
    assert set(got) == set(expected) | {"info", "session", "prefill", "prefill_again"}, sorted(got)
    assert value(result.stdout, "HANDLES_DIFFER") == "1"
    assert value(result.stdout, "STALE_ROUNDS") == "reused=0 reached=0"  # 20 more rounds of close A, create B
    assert value(result.stdout, "UNCHANGED") == "1"  # the failed steps left the last logits as they were
    info = json.loads(value(result.stdout, "INFO"))
    assert info["task"] == "causal-lm" and info["vocab_size"] == config["vocab_size"] and info["backend"] == "ort"


def test_every_entry_point_fails_when_the_runtime_cannot_start(built, broken_install):
    _, bundle, checks, _ = built
    result = subprocess.run(
        [str(checks), str(bundle), "start"], capture_output=True, text=True, timeout=300, env=broken_install
    )
    assert result.returncode == 0, result.stdout + result.stderr
    got = checks_output(result.stdout)
    names = ["open", "info", "session_create", "prefill_ids", "prefill_text", "generate", "step", "last_logits"]
    assert sorted(got) == sorted([*names, "cancel"])
    why = "the embedded Python runtime did not start: ImportError: deliberately broken install"
    for name, (status, message) in got.items():
        assert status == STATUS["RUNTIME_UNAVAILABLE"], (name, status, message)
        assert why in message, (name, message)
    assert why in value(result.stdout, "LAST_ERROR")
    # The two functions that need no Python still work.
    assert value(result.stdout, "DEFAULTS") == "32 1 0"
    assert value(result.stdout, "VERSION") == __version__
    assert "deliberately broken install" in result.stderr  # cffi's traceback


def test_cpp_example_exits_nonzero_when_the_runtime_cannot_start(built, broken_install):
    _, bundle, _, example = built
    if example is None:
        pytest.skip("cmake is not installed: the C++ example cannot be built here")
    result = subprocess.run(
        [str(example), str(bundle), "--ids", "5,6,7", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=broken_install,
    )
    assert result.returncode != 0
    assert "error: opening the bundle (status 8): the embedded Python runtime did not start" in result.stderr
    assert result.stdout == ""


def test_info_reports_parity_only_when_bound_to_the_graph(built, tmp_path):
    _, bundle, checks, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)

    def parity() -> dict:
        result = subprocess.run([str(checks), str(copy), "info"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and checks_output(result.stdout)["info"][0] == 0, result.stdout + result.stderr
        return json.loads(value(result.stdout, "INFO"))["parity"]

    (copy / "parity.json").unlink(missing_ok=True)
    assert parity()["status"] == "none"
    assert verify_bundle(copy).ok
    assert parity()["status"] == "ok" and parity()["reference"] == "stored"
    report = json.loads((copy / "parity.json").read_text())
    report["graph_sha256"] = "0" * 64  # the same verdict, bound to another graph
    (copy / "parity.json").write_text(json.dumps(report))
    summary = parity()
    assert summary["status"] == "none" and "another graph" in summary["reason"] and "ok" not in summary
    assert verify_bundle(copy).ok
    assert parity()["status"] == "ok"


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


def test_hostile_arguments_return_documented_codes_never_internal(built, tmp_path):
    """NULL, non-UTF-8 bytes, negative and huge counts, non-finite options, a bad bundle, a corrupt tokenizer: each
    entry point returns the header's code for it (INTERNAL is for bugs only) and reads nothing past a bad count."""
    _, bundle, checks, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["config"]["n_layer"] = 10**12
    (bad / "manifest.json").write_text(json.dumps(manifest))
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(bundle, broken)
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    non_utf8 = os.fsencode(tmp_path) + b"/bundle-\xff\xfe"
    shutil.copytree(bundle, os.fsdecode(non_utf8))
    args = [os.fsencode(checks), os.fsencode(bundle), b"hostile", os.fsencode(bad), os.fsencode(broken), non_utf8]
    result = subprocess.run(args, capture_output=True, timeout=300)
    stdout = result.stdout.decode("utf-8")
    assert result.returncode == 0, stdout + result.stderr.decode("utf-8", "replace")
    got = checks_output(stdout)
    expected = {
        "h_open_non_utf8_missing_path": ("BAD_BUNDLE", "manifest.json is missing"),
        "h_open_non_utf8_backend": ("INVALID_ARGUMENT", "options.backend is not valid UTF-8 (byte 0xff at offset 0)"),
        "h_open_negative_threads": ("INVALID_ARGUMENT", "threads '-1' must be an integer in [0, 1024]"),
        "h_open_huge_threads": ("INVALID_ARGUMENT", "must be an integer in [0, 1024]"),
        "h_open_null_out": ("INVALID_ARGUMENT", "out is NULL"),
        "h_open_empty_path": ("BAD_BUNDLE", "a bundle path must be a non-empty"),
        "h_open_bad_bundle": ("BAD_BUNDLE", "config.n_layer is 1000000000000, not an integer in [1, 1024]"),
        "h_open_non_utf8_named_copy": ("OK", ""),
        "h_open_broken_tokenizer": ("OK", ""),  # the tokenizer is read when first needed
        "h_info_broken_tokenizer": ("BAD_BUNDLE", "is not a tokenizer the tokenizers library reads"),
        "h_session_broken_tokenizer": ("OK", ""),
        "h_prefill_text_broken_tokenizer": ("BAD_BUNDLE", "is not a tokenizer the tokenizers library reads"),
        "h_prefill_ids_broken_tokenizer": ("OK", ""),  # ids need no tokenizer
        "h_open": ("OK", ""),
        "h_info_null_buffer": ("INVALID_ARGUMENT", "buffer too small"),
        "h_info_null_bundle": ("INVALID_ARGUMENT", "bundle is NULL"),
        "h_session_null_out": ("INVALID_ARGUMENT", "out is NULL"),
        "h_session": ("OK", ""),
        "h_prefill_text_non_utf8": ("INVALID_ARGUMENT", "text is not valid UTF-8 (byte 0xc3 at offset 4)"),
        "h_prefill_text_null": ("INVALID_ARGUMENT", "text is NULL"),
        "h_prefill_negative_batch": ("INVALID_ARGUMENT", "batch in [1, 65536], got -1"),
        "h_prefill_zero_batch": ("INVALID_ARGUMENT", "batch in [1, 65536], got 0"),
        "h_prefill_huge_batch": ("INVALID_ARGUMENT", "batch in [1, 65536], got 2147483647"),
        "h_prefill_negative_length": ("INVALID_ARGUMENT", "prompt 0 is NULL or empty"),
        "h_prefill_huge_length": ("CONTEXT_OVERFLOW", "prompt 0 has 2147483647 tokens"),
        "h_prefill_negative_id": ("INVALID_ARGUMENT", "-7"),
        "h_prefill_null_lengths": ("INVALID_ARGUMENT", "must be non-NULL"),
        "h_step_before_prefill": ("STATE", "needs a prefill first"),
        "h_prefill": ("OK", ""),
        "h_step_negative_count": ("INVALID_ARGUMENT", "one token per active row (1), got -1"),
        "h_step_null_tokens": ("INVALID_ARGUMENT", "one token per active row"),
        "h_logits_null_out": ("INVALID_ARGUMENT", "out must hold"),
        "h_generate_huge_max_tokens": ("CONTEXT_OVERFLOW", "exceed"),
        "h_generate_negative_max_tokens": ("INVALID_ARGUMENT", "max_new_tokens=-1"),
        "h_generate_nan_temperature": ("INVALID_ARGUMENT", "temperature=nan"),
        "h_generate_top_p_2": ("INVALID_ARGUMENT", "top_p=2.0"),
        "h_generate_huge_stop_count": ("INVALID_ARGUMENT", "num_stop_token_ids 2147483647 is more than"),
        "h_generate_stop_out_of_vocab": ("INVALID_ARGUMENT", "999999"),
        "h_cancel_null": ("INVALID_ARGUMENT", "session is NULL"),
        **{f"h_prefill_again_{i}": ("OK", "") for i in range(1, 6)},
    }
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for name, (status, message) in expected.items():
        assert got[name][0] == STATUS[status], (name, got[name])
        assert message in got[name][1], (name, got[name])
    assert int(value(stdout, "NEEDED")) > 2
