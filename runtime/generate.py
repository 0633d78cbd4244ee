"""Generation: prompts in, a stream of (row, token) out, with per-row stop and finished rows dropped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bigcode_deploy.runtime.errors import BigCodeError, ContextOverflow
from bigcode_deploy.runtime.manifest import MAX_STOP_IDS, Manifest
from bigcode_deploy.runtime.sampling import Sampler, SamplingOptions
from bigcode_deploy.runtime.session import DecodingSession, is_token_id


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] | None = None  # None: the bundle's (manifest stop_token_ids); (): none
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def __post_init__(self) -> None:
        value = self.max_new_tokens
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise BigCodeError(f"max_new_tokens={str(value)[:40]} must be an integer >= 1")


@dataclass(frozen=True)
class TokenEvent:
    row: int
    token: int
    finished: bool  # this row stops after this token (stop token or max_new_tokens)


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (the prefill's first token excluded)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def stop_ids(manifest: Manifest, options: GenerationOptions) -> set[int]:
    """The ids that end a row: the caller's stop_token_ids when given (() for none), else the bundle's default, the
    manifest's stop_token_ids (generation_config.json's eos_token_id, an int or a list, else config.json's), or for a
    manifest that does not record them, config.json's eos_token_id. Raises BigCodeError for an id outside the vocab."""
    vocab = manifest.config["vocab_size"]
    if options.stop_token_ids is not None:
        given = options.stop_token_ids
        if isinstance(given, (str, bytes, dict)) or not hasattr(given, "__iter__"):
            raise BigCodeError(f"stop_token_ids={str(given)[:40]} is not a list of token ids (give [id, ...] or ())")
        given = list(given)
        if len(given) > MAX_STOP_IDS:
            raise BigCodeError(f"{len(given)} stop token ids given; at most {MAX_STOP_IDS} are supported")
        bad = [t for t in given if not is_token_id(t, vocab)]
        if bad:
            raise BigCodeError(f"stop token {str(bad[0])[:40]} is not a token id in [0, {vocab})")
        return {int(t) for t in given}
    if manifest.stop_token_ids is not None:
        return set(manifest.stop_token_ids)
    eos = manifest.config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def stream(
    session: DecodingSession, prompts: list[list[int]], options: GenerationOptions, stats: GenerationStats | None = None
) -> Iterator[TokenEvent]:
    """Prefill the prompts, then yield each new token as it is chosen (see continue_stream)."""
    session.check_fits(prompts, options.max_new_tokens)
    stats = stats if stats is not None else GenerationStats()
    start = time.perf_counter()
    logits = session.prefill(prompts)
    stats.prefill_s = time.perf_counter() - start
    yield from continue_stream(session, logits, prompts, options, stats)


def continue_stream(
    session: DecodingSession,
    logits: np.ndarray,
    prompts: list[list[int]],
    options: GenerationOptions,
    stats: GenerationStats | None = None,
) -> Iterator[TokenEvent]:
    """From a prefilled session and its last logits (rows, vocab), yield each new token as it is chosen.

    A row ends at a stop token (which is yielded) or after max_new_tokens; ended rows leave the batch.
    `prompts` are the rows' tokens so far (for the repetition penalty).
    """
    if session.context_length + options.max_new_tokens > session.n_positions:
        raise ContextOverflow(
            f"{session.context_length} tokens of context plus max_new_tokens={options.max_new_tokens} exceed the "
            f"model's context of {session.n_positions} positions; lower max_new_tokens"
        )
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(options.sampling)
    stops = stop_ids(session.bundle.manifest, options)
    seen = [list(p) for p in prompts]  # each row's tokens so far (the repetition penalty reads them)
    produced = np.zeros(len(prompts), dtype=np.int64)
    start = time.perf_counter()
    while True:
        rows = session.rows
        tokens = sampler(logits, [seen[r] for r in rows])
        keep = np.ones(len(rows), dtype=bool)
        for i, (row, token) in enumerate(zip(rows, tokens)):
            seen[row].append(int(token))
            produced[row] += 1
            finished = int(token) in stops or produced[row] >= options.max_new_tokens
            keep[i] = not finished
            stats.new_tokens += 1
            yield TokenEvent(int(row), int(token), finished)
        if not keep.any():
            break
        session.keep_rows(keep)
        logits = session.step(tokens[keep])
        stats.decode_tokens += int(keep.sum())
    stats.decode_s = time.perf_counter() - start


def generate(
    session: DecodingSession, prompts: list[list[int]], options: GenerationOptions, stats: GenerationStats | None = None
) -> list[list[int]]:
    """Every row's new tokens (stop token included when one ended the row)."""
    out: list[list[int]] = [[] for _ in prompts]
    for event in stream(session, prompts, options, stats):
        out[event.row].append(event.token)
    return out
