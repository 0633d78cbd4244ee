"""Every CLI option's domain, and text that is not UTF-8, as untrusted input: a value outside the domain is one line
and exit 2 (no traceback, bounded time); a value inside it runs (exit 0). The domains below are the specification,
written here independently of the code that checks them (runtime/sampling.py, runtime/generate.py, runtime/bench.py,
runtime/backends.py). The Python API shares those checks: the same values are refused by it too."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigcode_deploy.cli import main
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.sampling import Sampler, SamplingOptions
from tests.helpers import TINY, make_hf_model

VOCAB, CONTEXT = TINY["vocab_size"], TINY["n_positions"]
PROMPT = ["--ids", "1,2"]  # two tokens: max_new_tokens may be up to CONTEXT - 2
SECONDS = 20.0  # one in-process run, on a busy 2-core machine (measured: < 0.3 s)


def as_int(text: str):
    try:
        return int(text)
    except ValueError:
        return None


def as_float(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def int_in(lo, hi):
    return lambda text: (v := as_int(text)) is not None and lo <= v <= hi


def float_where(ok):
    return lambda text: (v := as_float(text)) is not None and math.isfinite(v) and ok(v)


GENERATE_DOMAINS = {
    "--max-new-tokens": int_in(1, CONTEXT - 2),
    "--temperature": float_where(lambda v: v >= 0),
    "--top-k": int_in(0, math.inf),  # above the vocabulary: off
    "--top-p": float_where(lambda v: 0 < v <= 1),
    "--repetition-penalty": float_where(lambda v: v > 0),
    "--seed": int_in(0, 2**64 - 1),
    "--stop-token": int_in(0, VOCAB - 1),
    "--threads": int_in(0, 1024),
}
BENCH_DOMAINS = {
    "--prompt-len": int_in(1, CONTEXT - 2),  # with --new-tokens 2
    "--new-tokens": int_in(2, CONTEXT - 4),  # with --prompt-len 4
    "--batch": int_in(1, 2**31 - 1),
    "--repeats": int_in(1, 1000),
}
TEXTS = ["nan", "inf", "-inf", "-1", "0", "1", "2", "0.5", "1.5", "-0.0", "1e-300", "1e300", "x", "", "3.0", "62",
         "63", "100", "101", "1025", str(2**63), str(2**64), str(2**64 - 1), "9" * 5000, "1,2", " 1"]  # fmt: skip
# Values the domain admits but whose run would be long or heavy here (many threads, repeats or rows): left out.
HEAVY = {"--threads": 16, "--batch": 8, "--repeats": 3}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny exported bundle with a byte-level BPE tokenizer (vocabulary 101)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from bigcode_deploy.exporter.export import export_bundle

    root = tmp_path_factory.mktemp("options")
    make_hf_model("causal-lm", seed=0).save_pretrained(root / "ckpt")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x): return x"] * 10, trainers.BpeTrainer(vocab_size=VOCAB))
    tokenizer.save(str(root / "ckpt" / "tokenizer.json"))
    return export_bundle(root / "ckpt", root / "b", check=False, progress=lambda m: None)


def run(args: list[str]):
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    assert time.perf_counter() - start < SECONDS
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.output
    return result


def assert_one_line_refusal(result, args):
    """Exit 2; at most 3 lines on stderr (progress, then the error), the last and only error line `error: ...`."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.output)
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), (args, lines)
    assert sum(line.startswith("error: ") for line in lines) == 1, lines


def check(args: list[str], in_domain: bool) -> None:
    result = run(args)
    if in_domain:
        assert result.exit_code == 0, (args, result.output)
    else:
        assert_one_line_refusal(result, args)


def usable(option: str, text: str) -> bool:
    heavy = HEAVY.get(option)
    return heavy is None or (v := as_int(text)) is None or v <= heavy


OPTION_TEXTS = st.one_of(
    st.sampled_from(TEXTS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(option=st.sampled_from(sorted(GENERATE_DOMAINS)), text=OPTION_TEXTS)
def test_generate_options(bundle, option, text):
    if not usable(option, text):
        return
    extra = [] if option == "--max-new-tokens" else ["--max-new-tokens", "2"]
    check(["generate", str(bundle), *PROMPT, *extra, option, text], GENERATE_DOMAINS[option](text))


@FUZZ
@given(option=st.sampled_from(sorted(BENCH_DOMAINS)), text=OPTION_TEXTS)
def test_bench_options(bundle, option, text):
    if not usable(option, text):
        return
    base = {"--prompt-len": "4", "--new-tokens": "2", "--repeats": "1", "--batch": "1", option: text}
    check(["bench", str(bundle), *[a for pair in base.items() for a in pair], "--json"], BENCH_DOMAINS[option](text))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "100000000"], "must be an integer in [0, 1024]"),
        (["--temperature", "nan"], "temperature=nan must be a finite number"),
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--repetition-penalty", "-1"], "repetition_penalty=-1.0 must be > 0"),
        (["--top-p", "nan"], "top_p=nan must be a finite number"),
        (["--seed", "-1"], "seed=-1 must be an integer in [0, 2**64 - 1]"),
        (["--seed", str(2**64)], "seed=18446744073709551616 must be an integer"),
        (["--max-new-tokens", "0"], "max_new_tokens=0 must be an integer >= 1"),
    ],
)
def test_each_option_example_of_the_issue(bundle, args, message):
    result = run(["generate", str(bundle), *PROMPT, *args])
    assert_one_line_refusal(result, args)
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ["bench", "{b}", "--batch", "1000000000", "--prompt-len", "60", "--new-tokens", "2"],
            "more than this machine",
        ),
        (["bench", "{b}", "--prompt-len", "1000000000"], "exceeds the model's context of 64"),
        (["bench", "{b}", "--repeats", "100000000000"], "repeats=100000000000 must be an integer >= 1 and <= 1000"),
        (["forward", "--top", "0"], "0 is not in the range x>=1"),
        (["forward", "--top", "-1"], "is not in the range x>=1"),
        (["verify", "{b}", "--model", "{ckpt}", "--steps", "0"], "--steps 0"),
        (["verify", "{b}", "--model", "{ckpt}", "--seed", "-1"], "--seed -1"),
        (["optimize", "{b}", "{out}", "--target", "tensorrt", "--dtype", "fp16", "--max-batch", "0"], "x>=1"),
        (["build-engine", "{b}", "--workspace-gb", "nan"], ""),
    ],
)
def test_bench_forward_verify_and_build_options(bundle, tmp_path, command, message):
    """bench sizes are checked before any array is made (a huge batch or prompt fails at once, not by memory)."""
    args = [a.format(b=bundle, ckpt=bundle.parent / "ckpt", out=tmp_path / "out") for a in command]
    result = run(args)
    assert_one_line_refusal(result, args)
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_api_max_batch_and_workspace_are_checked_like_the_cli(bundle, tmp_path):
    from bigcode_deploy.runtime.tensorrt_build import build_engine
    from bigcode_deploy.workflows.optimize import optimize_bundle

    with pytest.raises(BigCodeError, match="--max-batch 0 must be an integer in"):
        optimize_bundle(bundle, tmp_path / "out", target="tensorrt", dtype="fp16", max_batch=0)
    with pytest.raises(BigCodeError, match="must be a number of GiB"):
        build_engine(bundle, workspace_gb=math.nan)
    assert not (tmp_path / "out").exists()


def test_verify_with_a_checkpoint_of_another_vocabulary_is_one_line(bundle, tmp_path):
    make_hf_model("causal-lm", seed=0, vocab_size=120).save_pretrained(tmp_path / "other")
    start = time.perf_counter()
    result = run(["verify", str(bundle), "--model", str(tmp_path / "other")])
    assert_one_line_refusal(result, "verify --model")
    assert "its config.json has vocab_size=120, the bundle's 101" in result.stderr
    assert time.perf_counter() - start < 5.0  # refused before any reference runs


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "{b}", "--prompt", "def f\udcff(x):"], "the prompt is not valid UTF-8 text"),
        (["generate", "{b}\udcff", "--ids", "1"], "\\udcff"),
        (["generate", "{b}\nsecond line", "--ids", "1"], "\\nsecond line"),
        (["generate", "{b}", "--ids", "1", "--backend", "o\udcffrt"], "'o\\udcffrt' is not one of"),
        (["inspect", "{b}\udcff"], "\\udcff"),
        (["export", "{b}\udcff", "{b}x"], "\\udcff"),
    ],
)
def test_text_that_is_not_utf8_is_one_line(bundle, args, message):
    """click on Linux hands undecodable argv bytes over as lone surrogates: they are refused or named, escaped."""
    args = [a.format(b=bundle) for a in args]
    result = run(args)
    assert_one_line_refusal(result, args)
    assert message in result.stderr, result.stderr


def test_a_non_utf8_prompt_in_a_real_process_is_one_line(bundle):
    """The bytes a shell passes, through the installed entry point: exit 2, one line, stderr writable."""
    command = [sys.executable.encode(), b"-m", b"bigcode_deploy.cli", b"generate", bytes(bundle), b"--prompt", b"a\xff"]
    done = subprocess.run(command, capture_output=True, timeout=120)
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    assert done.returncode == 2 and lines == [
        "error: the prompt is not valid UTF-8 text; pass token ids with --ids instead"
    ]


def test_the_python_api_refuses_the_same_values(bundle):
    with open_generator(bundle) as g:
        for options, message in (
            (dict(temperature=math.nan), "temperature=nan must be a finite number"),
            (dict(temperature=10**400), "temperature=1000000000000000000000000000000000000... must be a finite"),
            (dict(top_p=1.5), "top_p=1.5 must be in"),
            (dict(seed=2**64), "seed=18446744073709551616 must be"),
            (dict(max_new_tokens="3"), "max_new_tokens=3 must be an integer >= 1"),
            (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer"),
            (dict(top_k=True), "top_k=True must be an integer"),
        ):
            with pytest.raises(BigCodeError) as caught:
                g.generate([[1, 2]], **options)
            assert message in str(caught.value) and "\n" not in str(caught.value), (options, caught.value)
        for prompt in ("a\udcff", b"abc"):
            with pytest.raises(BigCodeError, match="not valid UTF-8 text"):
                g.stream_text(prompt)
        for call, message in (
            (lambda: g.generate([[1, 2]], stop_token_ids=5), "stop_token_ids=5 is not a list of token ids"),
            (lambda: g.generate([[True, 2]]), "prompt 0 holds bool values"),
            (lambda: g.decode([-1]), "token id -1 is not a token id in [0, 101)"),
            (lambda: g.decode([99999]), "token id 99999 is not a token id in [0, 101)"),
            (lambda: g.decode([1], show_special="yes"), "show_special=yes must be True or False"),
            (lambda: g.decode(5), "ids=5 is not a list of token ids"),
            (lambda: g.decode(None), "ids=None is not a list of token ids"),
            (lambda: g.decode("12"), "ids=12 is not a list of token ids"),
            (lambda: g.generate("abc"), "prompts must be lists of token ids, not text"),
            (lambda: g.generate([[1]], stop_token_ids="5"), "stop_token_ids=5 is not a list"),
            (lambda: g.generate([[1]], stop_token_ids=[1] * 65), "65 stop token ids given; at most 64"),
            (lambda: g.generate([[1]], stop_token_ids=[10**400]), "stop token " + "1" + "0" * 39 + " is not"),
        ):
            with pytest.raises(BigCodeError) as caught:
                call()
            assert message in str(caught.value) and len(str(caught.value)) < 200, caught.value
        # numpy integers are token ids wherever ids are taken
        assert g.generate([[1]], max_new_tokens=2, stop_token_ids=np.array([5])) is not None
        assert g.generate([[1]], max_new_tokens=2, stop_token_ids=[np.int64(5)]) is not None
        assert isinstance(g.decode(np.array([1, 2], np.int64)), str)
    with pytest.raises(BigCodeError, match="threads"):
        with open_generator(bundle, threads=10**6):
            pass


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    temperature=st.sampled_from([0.0, 1e-300, 1e-30, 0.7, 1.0, 1e30]),
    top_k=st.sampled_from([0, 1, 3, 10**6]),
    top_p=st.sampled_from([1e-300, 0.1, 0.9, 1.0]),
    penalty=st.sampled_from([1e-30, 0.5, 1.0, 1.3, 1e30, 1e300]),
    scale=st.sampled_from([1e-30, 1.0, 1e4, 5e37]),  # logits up to ~3e38, float32's largest
    seed=st.integers(0, 2**64 - 1),
)
def test_sampling_in_its_domain_always_returns_token_ids(temperature, top_k, top_p, penalty, scale, seed):
    """Extreme values inside each domain (a tiny temperature, a huge penalty, logits near float32's range) never
    give NaN probabilities: every row gets a token id in the vocabulary."""
    rng = np.random.default_rng(seed % 1000)
    logits = np.clip(rng.standard_normal((3, 11)) * scale, -3e38, 3e38).astype(np.float32)
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed)
    tokens = Sampler(options)(logits, [list(range(11)), [1, 2], []])
    assert tokens.shape == (3,) and ((0 <= tokens) & (tokens < 11)).all()


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e300])
def test_an_extreme_repetition_penalty_saturates_without_warnings(penalty):
    import warnings

    from bigcode_deploy.runtime.sampling import apply_repetition_penalty

    logits = np.array([[1.0, -2.0, 3.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide-by-zero / overflow warnings would reach the user's stderr
        out = apply_repetition_penalty(logits, [[0, 1]], penalty)
    assert np.isfinite(out).all() and out[0, 2] == 3.0


def test_bench_prints_its_progress_line_only_once_the_backend_opened(bundle):
    for args in (["--threads", "99999999999"], ["--backend", "tensorrt"]):
        result = CliRunner().invoke(main, ["bench", str(bundle), *args])
        assert result.exit_code == 2 and "benchmarking" not in result.output, result.output
