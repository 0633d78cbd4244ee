"""Generated hostile manifests: every field of a real bundle's manifest.json (every nested path, found by walking the
JSON tree) replaced by hostile values or removed, plus random JSON values from hypothesis. Each must be refused with
one BundleError line, in bounded time and memory, or be a value the format allows, in which case the bundle still
opens (or is refused in one line when its graph is checked). The CLI gives exit 2, at most 3 lines, no traceback,
and writes nothing."""

from __future__ import annotations

import json
import math
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigcode_deploy.cli import main
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BundleError
from bigcode_deploy.runtime.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest
from bigcode_deploy.runtime.reference import ReferenceOutputs

HOSTILE = [
    None,
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    10**12,
    10**400,  # beyond float's range: math.isfinite raises OverflowError on it
    1.5,
    True,
    "x",
    "../../etc/passwd",
    "/etc/passwd",
    [],
    {},
    [[[[]]]],
    {"a": {"b": [1, None]}},
]
DELETE = object()


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    """The shared 2-layer MQA bundle (tests/conftest.py), only ever copied here, never changed."""
    return tiny_bundles["mqa"]


@pytest.fixture(scope="module")
def raw(bundle) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def paths(value, prefix=()) -> list[tuple]:
    """Every path into a JSON value (objects and lists, not the root)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        out.append((*prefix, key))
        out += paths(item, (*prefix, key))
    return out


def _get(raw: dict, path: tuple):
    for key in path:
        raw = raw[key]
    return raw


def mutated(raw: dict, path: tuple, value) -> dict:
    out = json.loads(json.dumps(raw))  # a deep copy, faster than copy.deepcopy
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


def judge(raw_manifest: dict) -> str | None:
    """None when the manifest is accepted; else the one-line refusal (asserting it is one short line)."""
    try:
        Manifest.from_json(raw_manifest, where="manifest.json")
    except BundleError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 400, message
        return message
    return None


def test_every_field_with_every_hostile_value(raw, bundle, tmp_path):
    all_paths = paths(raw)
    assert len(all_paths) > 150  # the whole tree, nested lists included
    accepted, started, slowest = [], time.perf_counter(), 0.0
    for path in all_paths:
        original = _get(raw, path)
        for value in [*HOSTILE, DELETE]:
            if value is not DELETE and json.dumps(value) == json.dumps(original):
                continue  # not a change
            t0 = time.perf_counter()
            if judge(mutated(raw, path, value)) is None:
                accepted.append((path, value))
            slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.5, slowest
    assert time.perf_counter() - started < 30
    # What is accepted lies in an informative field or is a value in a field's range; never a change to a size, a
    # dtype, the I/O spec, a dim, the cache, the graph's files, the format or the custom-op table.
    baseline = Manifest.from_json(raw).to_json()
    changes = []
    for path, value in accepted:
        changed = mutated(raw, path, value)
        if value is DELETE and Manifest.from_json(changed).to_json() == baseline:
            continue  # a field with a default, removed: the same manifest
        assert not any(path[: len(n)] == n for n in NEVER_ACCEPTED), (path, value)
        assert not (isinstance(value, float) and not math.isfinite(value)), (path, value)
        changes.append(changed)
    assert ("config", "eos_token_id") not in {p for p, v in accepted if v not in (None, 0, DELETE)}
    # Every accepted one still opens and loads its reference, or is refused in one line where a file is read.
    copy_dir = tmp_path / "accepted"
    shutil.copytree(bundle, copy_dir)
    for changed in changes:
        (copy_dir / MANIFEST_FILE).write_text(json.dumps(changed))
        try:
            ReferenceOutputs.load(Bundle.open(copy_dir))
        except BundleError as exc:
            assert "\n" not in str(exc)


NEVER_ACCEPTED = [
    ("format",),
    ("format_version",),
    ("task",),
    ("dtype",),
    ("target",),
    ("opset",),
    ("logits_positions",),
    ("inputs",),
    ("outputs",),
    ("dims",),
    ("kv_cache",),
    ("graph",),
    ("passes",),
    ("quantization",),
    ("custom_ops", "domain"),
    ("custom_ops", "version"),
    ("custom_ops", "ops"),
    *[("config", k) for k in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head", "multi_query")],
    ("reference", "sha256"),
    ("reference", "dtype"),
    ("reference", "model_dtype"),
]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_json_values_anywhere(raw, data):
    path = data.draw(st.sampled_from(paths(raw)))
    value = data.draw(json_values)
    t0 = time.perf_counter()
    message = judge(mutated(raw, path, value))
    assert time.perf_counter() - t0 < 0.5
    if message is None:  # accepted: the value must be what the field allows, so the manifest reads back the same
        assert Manifest.from_json(json.loads(json.dumps(mutated(raw, path, value))), where="m").to_json() is not None


@pytest.mark.parametrize(
    "path, value",
    [
        (("config", "n_layer"), 10**12),
        (("kv_cache", "num_layers"), 10**12),
        (("config", "vocab_size"), 10**12),
        (("config", "n_positions"), 10**12),
        (("config", "n_head"), 10**12),
        (("dims", "batch", "max"), 10**30),
        (("reference", "steps"), 10**12),
        (("reference", "greedy_tokens"), 10**12),
    ],
)
def test_huge_sizes_are_refused_without_allocating(raw, path, value):
    tracemalloc.start()
    try:
        message = judge(mutated(raw, path, value))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message is not None and (path[-1] in message or path[0] in message), message
    assert peak < 4 << 20, peak  # 4 MiB: the manifest's own copies, never a per-layer list of 10**12


def test_eos_as_a_string_is_refused(raw):
    message = judge(mutated(raw, ("config", "eos_token_id"), "82"))
    assert message is not None and "config.eos_token_id" in message and "'82'" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"format": "bigcode-deploy-bundle", "format_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[" * 100000 + "]" * 100000, "nests arrays or objects too deeply to read"),
        ('{"format": NaN}', "field format is NaN or infinite"),
        ("\udcff", "is not UTF-8 text"),
    ],
    ids=["5000-digit-int", "deep-nesting", "nan-literal", "not-utf8"],
)
def test_unparsable_manifests_are_one_line(bundle, tmp_path, text, fragment):
    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    (bad / MANIFEST_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BundleError, match=fragment):
        Manifest.read(bad)


def test_an_oversized_manifest_is_refused_before_reading(bundle, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    with open(bad / MANIFEST_FILE, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"more than the {MAX_MANIFEST_BYTES} this file may hold"):
            Manifest.read(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # refused by its size before anything is read


CLI_CASES = [
    (("config", "n_layer"), 10**12),
    (("config", "eos_token_id"), "82"),
    (("config", "layer_norm_epsilon"), math.nan),
    (("opset",), "18"),
    (("graph", "file"), "../model.onnx"),
    (("graph", "external_data"), "/etc/passwd"),
    (("graph", "sha256"), None),
    (("inputs", 3, "shape", 2), 16.0),
    (("kv_cache", "past_shape", 2), True),
    (("dims", "batch", "min"), True),
    (("passes",), [{"name": "x", "count": -1}]),
    (("quantization",), {"scheme": "int8", "bits": "8"}),
    (("reference", "prompts", 0, 0), -1),
    (("reference", "bytes"), "many"),
    (("custom_ops", "used"), ["Evil"]),
    (("source", "sha256"), {"../config.json": "0" * 64}),
]


@pytest.mark.parametrize("path, value", CLI_CASES, ids=[".".join(map(str, p)) for p, _ in CLI_CASES])
def test_cli_verify_and_inspect_refuse_in_one_line(raw, bundle, tmp_path, path, value):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / MANIFEST_FILE).write_text(json.dumps(mutated(raw, path, value)))
    before = sorted((p.name, p.stat().st_size) for p in bad.iterdir())
    for command in ("verify", "inspect"):
        result = CliRunner().invoke(main, [command, str(bad)])
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.strip().splitlines()
        assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    assert sorted((p.name, p.stat().st_size) for p in bad.iterdir()) == before  # nothing written


def test_a_manifest_that_is_a_directory_or_a_device_gets_its_own_line(bundle, tmp_path):
    for kind, make, fragment in (
        ("dir", lambda p: p.mkdir(), "is a directory, not a file"),
        ("device", lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ):
        bad = tmp_path / kind
        shutil.copytree(bundle, bad)
        (bad / MANIFEST_FILE).unlink()
        make(bad / MANIFEST_FILE)
        with pytest.raises(BundleError, match=fragment):
            Manifest.read(bad)
