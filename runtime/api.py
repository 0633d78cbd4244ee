"""The Python API: open a bundle on a backend, then generate, stream or step.

from bigcode_deploy.runtime.api import open_generator

with open_generator("out/demo") as g:                     # backend "ort" by default
    tokens = g.generate([[1, 2, 3], [4, 5]], max_new_tokens=8)        # greedy, per-row stop
    session = g.session()                                 # step-level control
    logits = session.prefill([[1, 2, 3]])                 # (1, vocab)
    logits = session.step(logits.argmax(-1))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from bigcode_deploy.runtime.backends import open_backend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.generate import GenerationOptions, GenerationStats, TokenEvent, generate, stream
from bigcode_deploy.runtime.sampling import SamplingOptions
from bigcode_deploy.runtime.session import DecodingSession
from bigcode_deploy.runtime.text import IncrementalDecoder, load_tokenizer, parse_ids


class Generator:
    """Generation over one opened bundle and an entered backend: token ids in, token ids (or text) out.

    generate(prompts (list of id lists), **options) -> each row's new ids; stream(...) -> TokenEvent per token;
    stream_text(prompt) -> printable pieces; session() -> a DecodingSession for step-level control. Options:
    max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), repetition_penalty (1: off), seed,
    stop_token_ids (None: the config's eos). Raises BigCodeError for bad options or ids, ContextOverflow when a
    prompt plus max_new_tokens exceeds n_positions (before any work)."""

    def __init__(self, bundle: Bundle, backend):
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = load_tokenizer(bundle)

    def session(self) -> DecodingSession:
        return DecodingSession(self.backend, self.bundle)

    @staticmethod
    def options(
        max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop_token_ids=None
    ) -> GenerationOptions:
        return GenerationOptions(
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            sampling=SamplingOptions(
                temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed
            ),
        )

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BigCodeError(f"{self.bundle.path} has no tokenizer.json: give token ids (--ids) instead of text")
        try:
            text.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise BigCodeError("the prompt is not valid UTF-8 text; pass token ids with --ids instead") from None
        return self.tokenizer.encode(text).ids

    def generate(self, prompts: list[list[int]], stats: GenerationStats | None = None, **options) -> list[list[int]]:
        return generate(self.session(), prompts, self.options(**options), stats)

    def stream(self, prompts: list[list[int]], stats: GenerationStats | None = None, **options) -> Iterator[TokenEvent]:
        return stream(self.session(), prompts, self.options(**options), stats)

    def stream_text(self, prompt: str | None, ids: str | list[int] | None = None, **options):
        """One prompt (text, or ids) -> (iterator of printable pieces, stats filled as it runs)."""
        token_ids = (
            self.encode(prompt) if prompt is not None else (parse_ids(ids) if isinstance(ids, str) else list(ids))
        )
        stats = GenerationStats()
        events = self.stream([token_ids], stats, **options)
        if self.tokenizer is None:
            return (f"{e.token}," if not e.finished else f"{e.token}" for e in events), stats
        decoder = IncrementalDecoder(self.tokenizer)
        return (decoder.push(e.token) for e in events), stats


@contextlib.contextmanager
def open_generator(
    path: str | Path, backend: str = "ort", threads: int = 0, opener: Callable | None = None
) -> Iterator[Generator]:
    """A Generator over BUNDLE on a backend (ort, ort-cuda, tensorrt), set up on enter and closed on exit.

    opener(bundle, backend, threads=...) opens the backend (default: bigcode_deploy.runtime.backends.open_backend;
    the CLI passes one that also offers the torch reference). Raises BundleError for a bundle that cannot be used,
    BackendUnavailable for a backend missing here."""
    bundle = Bundle.open(path)
    with (opener or open_backend)(bundle, backend, threads=threads) as b:
        yield Generator(bundle, b)
