"""DecodingSession: a failed call leaves the session exactly as it was, and misuse is a one-line BigCodeError."""

from __future__ import annotations

import numpy as np
import pytest

from bigcode_deploy.runtime.api import Generator
from bigcode_deploy.runtime.backends import OrtBackend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError, StateError
from bigcode_deploy.runtime.session import DecodingSession

PROMPTS = [[5, 17, 42, 8], [12, 7], [71]]


class Flaky(OrtBackend):
    """The ONNX Runtime backend, made to raise on the next step or select_rows when told to."""

    fail_next: str | None = None

    def step(self, input_ids, attention_mask, position_ids, cache):
        if self.fail_next == "step":
            self.fail_next = None
            raise RuntimeError("injected: the backend failed mid-step")
        return super().step(input_ids, attention_mask, position_ids, cache)

    def select_rows(self, cache, rows):
        if self.fail_next == "select_rows":
            self.fail_next = None
            raise RuntimeError("injected: the backend failed selecting rows")
        return super().select_rows(cache, rows)


@pytest.fixture
def backend(tiny_bundles):
    with Flaky(Bundle.open(tiny_bundles["mqa"])) as b:
        yield b


def snapshot(s: DecodingSession) -> dict:
    """Everything a session holds, copied (the cache by identity and by value)."""
    return {
        "attention_mask": s.attention_mask.copy(),
        "next_position": s.next_position.copy(),
        "rows": s.rows.copy(),
        "cache": s.cache,
        "cache_values": None if s.cache is None else [v.numpy().copy() for v in s.cache],
    }


def assert_unchanged(s: DecodingSession, before: dict) -> None:
    after = snapshot(s)
    for key in ("attention_mask", "next_position", "rows"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        assert after[key].shape == before[key].shape, key
    assert after["cache"] is before["cache"]
    if before["cache_values"] is not None:
        for a, b in zip(after["cache_values"], before["cache_values"]):
            np.testing.assert_array_equal(a, b)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, repr(message)
    return message


def test_step_before_prefill_is_a_state_error(backend):
    s = DecodingSession(backend, backend.bundle)
    before = snapshot(s)
    with pytest.raises(StateError) as exc:
        s.step(np.array([1]))
    assert "needs a prefill first" in one_line(exc)
    assert_unchanged(s, before)
    with pytest.raises(StateError):
        s.keep_rows(np.array([True]))


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []], [[1, 2.5]], [1, 2]], ids=str)
def test_bad_prompts_are_one_line_errors_and_change_nothing(backend, prompts):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    before = snapshot(s)
    with pytest.raises(BigCodeError) as exc:
        s.prefill(prompts)
    one_line(exc)
    assert_unchanged(s, before)


def test_generate_with_no_prompts_is_a_bigcode_error(backend):
    g = Generator(backend.bundle, backend)
    with pytest.raises(BigCodeError) as exc:
        g.generate([], max_new_tokens=2)
    assert "at least one prompt" in one_line(exc)
    with pytest.raises(BigCodeError):
        list(g.stream([], max_new_tokens=2))


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([1, 2], "one token per active row (3), got 2"),
        ([1, 2, 3, 4], "one token per active row (3), got 4"),
        ([1, 2, 10**6], "outside the vocabulary"),
        ([1, -1, 2], "outside the vocabulary"),
        ([[1, 2, 3]], "one token per active row"),
        ([1.5, 2, 3], "integer token ids"),
    ],
    ids=["too-few", "too-many", "out-of-vocab", "negative", "2-d", "float"],
)
def test_bad_step_tokens_are_one_line_errors_and_change_nothing(backend, tokens, message):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    before = snapshot(s)
    with pytest.raises(BigCodeError) as exc:
        s.step(np.array(tokens))
    assert message in one_line(exc)
    assert_unchanged(s, before)


def test_backend_error_mid_step_rolls_back(backend):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    s.step(np.array([3, 4, 5]))
    before = snapshot(s)
    backend.fail_next = "step"
    with pytest.raises(RuntimeError, match="injected"):
        s.step(np.array([6, 7, 8]))
    assert_unchanged(s, before)
    # The session goes on as if the failed call had never been made.
    retried = s.step(np.array([6, 7, 8]))
    fresh = DecodingSession(backend, backend.bundle)
    fresh.prefill(PROMPTS)
    fresh.step(np.array([3, 4, 5]))
    np.testing.assert_allclose(retried, fresh.step(np.array([6, 7, 8])), atol=1e-5)
    np.testing.assert_array_equal(s.attention_mask, fresh.attention_mask)
    np.testing.assert_array_equal(s.next_position, fresh.next_position)


def test_backend_error_in_prefill_keeps_the_previous_batch(backend):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    before = snapshot(s)
    backend.fail_next = "step"
    with pytest.raises(RuntimeError, match="injected"):
        s.prefill([[9, 9]])
    assert_unchanged(s, before)
    s.step(np.array([1, 2, 3]))  # still the three-row batch


def test_keep_rows_validates_and_rolls_back(backend):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    before = snapshot(s)
    for keep, message in (
        ([True, False], "one flag per active row (3), got shape (2,)"),
        ([False, False, False], "would drop every row"),
    ):
        with pytest.raises(BigCodeError) as exc:
            s.keep_rows(np.array(keep))
        assert message in one_line(exc)
        assert_unchanged(s, before)
    backend.fail_next = "select_rows"
    with pytest.raises(RuntimeError, match="injected"):
        s.keep_rows(np.array([True, False, True]))
    assert_unchanged(s, before)
    s.keep_rows(np.array([True, False, True]))
    assert s.rows.tolist() == [0, 2] and s.attention_mask.shape[0] == 2 and s.next_position.tolist() == [4, 1]


def test_keep_rows_takes_booleans_only(backend):
    s = DecodingSession(backend, backend.bundle)
    s.prefill(PROMPTS)
    before = snapshot(s)
    for keep in (["False", "False", "yes"], [np.nan, 0.0, 0.0], [1, 0, 1]):
        with pytest.raises(BigCodeError, match="keep_rows takes booleans"):
            s.keep_rows(np.array(keep))
        assert_unchanged(s, before)
