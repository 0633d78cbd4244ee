"""config.json as untrusted input: every field the model reads, mutated with hostile values, is refused in one line
(exit 2, no traceback, nothing written, bounded time) or, when the value is in the field's domain, read as it is.

The domains below are the specification, written here independently of exporter/config.py: a value outside them must
be refused by `bigcode-deploy export` before any weight is read; a value inside them must load (the `forward` command
runs it) or be refused in one line because it disagrees with the weights (a size other than the checkpoint's)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.config import ACTIVATIONS, GPTBigCodeConfig
from bigcode_deploy.runtime.errors import ConfigError
from tests.helpers import TINY, make_hf_model

MAX_DIM, MAX_LAYERS = 2**31 - 1, 1024
VOCAB = TINY["vocab_size"]
SECONDS = 8.0  # one refused export, in-process, on a busy 2-core machine (measured: < 0.5 s)


def is_int(v, lo=1, hi=MAX_DIM):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_number(v):
    """A JSON number that is finite as a float (10**400 is not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1.7976931348623157e308


def token_id(v):
    return is_int(v, 0, VOCAB - 1)


# field -> is the value in the field's domain (ignoring whether it agrees with the weights)
DOMAINS = {
    "vocab_size": is_int,
    "n_positions": is_int,
    "n_embd": is_int,
    "n_layer": lambda v: is_int(v, 1, MAX_LAYERS),
    "n_head": is_int,
    "n_inner": lambda v: v is None or is_int(v),
    "num_labels": is_int,
    "activation_function": lambda v: isinstance(v, str) and v in ACTIVATIONS,
    "layer_norm_epsilon": lambda v: is_number(v) and 0 < v < 1,
    "initializer_range": lambda v: is_number(v) and v >= 0,
    "resid_pdrop": lambda v: is_number(v) and 0 <= v <= 1,
    "embd_pdrop": lambda v: is_number(v) and 0 <= v <= 1,
    "attn_pdrop": lambda v: is_number(v) and 0 <= v <= 1,
    "classifier_dropout": lambda v: v is None or (is_number(v) and 0 <= v <= 1),
    "bos_token_id": lambda v: v is None or token_id(v),
    "pad_token_id": lambda v: v is None or token_id(v),
    "eos_token_id": lambda v: (
        v is None or token_id(v) or (isinstance(v, list) and 0 < len(v) <= 64 and all(map(token_id, v)))
    ),
    "torch_dtype": lambda v: v is None or (isinstance(v, str) and len(v) <= 200),
    **{
        flag: lambda v: isinstance(v, bool)
        for flag in (
            "scale_attn_weights",
            "use_cache",
            "attention_softmax_in_fp32",
            "scale_attention_softmax_in_fp32",
            "multi_query",
            "tie_word_embeddings",
        )
    },
    "add_cross_attention": lambda v: v is False,  # a decoder with cross-attention is not this model
    "model_type": lambda v: v == "gpt_bigcode",
}
ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}
HOSTILE = [None, math.nan, math.inf, -math.inf, -1, 0, 1, 2, 10**12, 10**30, 2**31, "7", "false", "", [1], [[1]], [],
           {"a": 1}, {"a": {"b": [1]}}, True, False, 0.5, 1e-6, 1e300, -0.0, "gelu", "x" * 5000]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=200), max_size=3),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers-written tiny checkpoint (2 layers, vocabulary 101); its config.json text."""
    model_dir = tmp_path_factory.mktemp("fuzz") / "ckpt"
    make_hf_model("causal-lm", seed=0).save_pretrained(model_dir)
    return model_dir, json.loads((model_dir / "config.json").read_text())


def with_config(base: Path, raw_config, root: Path, text: str | None = None) -> Path:
    """A copy of the checkpoint directory (weights linked, not copied) with this config.json."""
    model_dir = root / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    os.symlink(base / "model.safetensors", model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(text if text is not None else json.dumps(raw_config))
    return model_dir


def refused_in_one_line(args: list[str], out_dir: Path | None = None) -> str:
    """Run the CLI in-process; assert exit 2, at most 3 lines on stderr, the last `error: ...`, no traceback,
    nothing at out_dir, within SECONDS. Returns the error line."""
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    elapsed = time.perf_counter() - start
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.output)
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), lines
    assert "Traceback" not in result.output
    assert out_dir is None or not out_dir.exists()
    assert elapsed < SECONDS, elapsed
    return lines[-1]


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),  # ~4 s; FUZZ_EXAMPLES=5000 for a longer search
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(sorted(DOMAINS) + sorted(ALIASES)), value=VALUES)
def test_every_field_with_hostile_values(checkpoint, tmp_path, field, value):
    """Out of domain: export exits 2 in one line naming the field, writes nothing. In domain: the model loads and
    runs one forward pass (exit 0), or the value disagrees with the weights and that is one line (exit 2)."""
    base, raw = checkpoint
    model_dir = with_config(base, {**raw, field: value}, tmp_path)
    canonical = ALIASES.get(field, field)
    in_domain = DOMAINS[canonical](value)
    if not in_domain:
        line = refused_in_one_line(["export", str(model_dir), str(tmp_path / "out"), "--no-check"], tmp_path / "out")
        json_literal = isinstance(value, float) and not math.isfinite(value)  # NaN/Infinity: refused as JSON
        assert field in line or canonical in line or json_literal or canonical == "model_type", line
        return
    result = CliRunner().invoke(main, ["forward", str(model_dir), "--ids", "1,2", "--top", "2"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    else:
        assert len(result.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        # A real published StarCoderBase-3B copy (michaelfeil/ct2fast-starcoderbase-3b) has this null.
        (dict(layer_norm_epsilon=None), "layer_norm_epsilon=None must be a number in (0, 1): set it to 1e-05"),
        (dict(multi_query="false"), "multi_query='false' must be true or false (a JSON boolean"),
        (dict(scale_attn_weights=0), "scale_attn_weights=0 must be true or false"),
        (dict(eos_token_id=[[0]]), "eos_token_id=[[0]] must be a token id in [0, 101)"),
        (dict(eos_token_id={"id": 0}), "eos_token_id={'id': 0} must be a token id"),
        (dict(bos_token_id=101), "bos_token_id=101 must be a token id in [0, 101)"),
        (dict(n_layer=10**7), "n_layer=10000000 must be an integer in [1, 1024]"),
        (dict(n_embd=-32), "n_embd=-32 must be an integer"),
        (dict(vocab_size="101"), "vocab_size='101' must be an integer"),
        (dict(resid_pdrop=1.5), "resid_pdrop=1.5 must be a probability in [0, 1]"),
        (dict(initializer_range=-0.02), "initializer_range=-0.02 must be a number >= 0"),
    ],
)
def test_each_example_of_the_issue(checkpoint, tmp_path, changes, message):
    base, raw = checkpoint
    model_dir = with_config(base, {**raw, **changes}, tmp_path)
    line = refused_in_one_line(["export", str(model_dir), str(tmp_path / "out")], tmp_path / "out")
    assert message in line and "config.json" in line, line


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_layer=1000), "declares n_layer=1000 but the weight files in"),  # in range: the headers refuse it
        (dict(vocab_size=MAX_DIM), "implies (2147483647, 32) (vocab_size=2147483647, n_embd=32)"),
        (dict(n_positions=10**9), "wpe.weight in model.safetensors has shape (64, 32)"),
        (dict(n_inner=MAX_DIM), "c_fc.weight in model.safetensors has shape (128, 32)"),
    ],
)
def test_sizes_out_of_proportion_to_the_weights_fail_before_building(checkpoint, tmp_path, changes, message):
    """Compared with the weight files' headers before any layer is built: fast and one line."""
    base, raw = checkpoint
    model_dir = with_config(base, {**raw, **changes}, tmp_path)
    start = time.perf_counter()
    line = refused_in_one_line(["export", str(model_dir), str(tmp_path / "out")], tmp_path / "out")
    assert message in line and time.perf_counter() - start < 3.0, line


def test_values_in_the_domain_load(checkpoint, tmp_path):
    """n_inner null (4 * n_embd), an eos list, a smaller epsilon, unused dropouts: the checkpoint still loads."""
    base, raw = checkpoint
    changes = dict(n_inner=None, eos_token_id=[0, 5], layer_norm_epsilon=1e-6, resid_pdrop=0.0, classifier_dropout=0.3)
    model_dir = with_config(base, {**raw, **changes}, tmp_path)
    config = GPTBigCodeConfig.from_json_file(model_dir / "config.json")
    assert config.n_inner == 4 * config.n_embd and config.eos_token_id == [0, 5]
    result = CliRunner().invoke(main, ["forward", str(model_dir), "--ids", "1,2"])
    assert result.exit_code == 0, result.output


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    "kind, message",
    [
        ("directory", "is a directory, not a file"),
        ("symlink loop", "cannot be read"),
        ("fifo", "is not a regular file"),
        ("huge", "more than the 8388608 this file may hold"),
        ("not utf-8", "is not UTF-8 text"),
        ("array", "must hold a JSON object, not list"),
        ("deep", "nests arrays or objects too deeply"),
        ("long integer", "is not valid JSON"),
        ("nan elsewhere", "field extra.list[1] is NaN or infinite"),
        ("1e999", "field n_embd is NaN or infinite"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_one_line(checkpoint, tmp_path, kind, message):
    base, raw = checkpoint
    model_dir = with_config(base, raw, tmp_path)
    path = model_dir / "config.json"
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        os.symlink(path, path)
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(9 << 20)  # sparse: refused by its size before a byte is read
    elif kind == "not utf-8":
        path.write_bytes(b'{"model_type": "gpt_bigcode\xff"}')
    elif kind == "array":
        path.write_text("[1, 2]")
    elif kind == "deep":
        path.write_text('{"a": ' + deep(100_000) + "}")
    elif kind == "long integer":
        path.write_text('{"n_embd": ' + "9" * 5000 + "}")
    elif kind == "nan elsewhere":
        path.write_text(json.dumps({**raw, "extra": {"list": [1, math.nan]}}))
    elif kind == "1e999":
        path.write_text(json.dumps(raw).replace('"n_embd": 32', '"n_embd": 1e999'))
    line = refused_in_one_line(["export", str(model_dir), str(tmp_path / "out")], tmp_path / "out")
    assert message in line and "config.json" in line, line
    with pytest.raises(ConfigError, match="config.json"):
        GPTBigCodeConfig.from_json_file(path)


def test_the_real_command_exits_2_with_one_line(checkpoint, tmp_path):
    """The installed entry point in its own process: the exit code and stderr a shell sees."""
    base, raw = checkpoint
    model_dir = with_config(base, {**raw, "layer_norm_epsilon": None}, tmp_path)
    command = [sys.executable, "-m", "bigcode_deploy.cli", "export", str(model_dir), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) <= 3 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: ") and "layer_norm_epsilon=None" in lines[-1]
    assert not (tmp_path / "out").exists()
