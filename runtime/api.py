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
from bigcode_deploy.runtime.fim import FimPrompter, FimTokens, fim_stop_ids, no_fim_error
from bigcode_deploy.runtime.generate import GenerationOptions, GenerationStats, TokenEvent, generate, stop_ids, stream
from bigcode_deploy.runtime.sampling import SamplingOptions
from bigcode_deploy.runtime.session import DecodingSession, is_token_id
from bigcode_deploy.runtime.text import IncrementalDecoder, load_tokenizer, parse_ids

_NOT_LOADED = object()


class Generator:
    """Generation over one opened bundle and an entered backend: token ids in, token ids (or text) out.

    generate(prompts (list of id lists), **options) -> each row's new ids; stream(...) -> TokenEvent per token;
    stream_text(prompt) -> printable pieces; session() -> a DecodingSession for step-level control. Options:
    max_new_tokens, temperature (0: greedy), top_k (0: off), top_p (1: off), repetition_penalty (1: off), seed,
    stop_token_ids (None: the bundle's, i.e. the manifest's stop_token_ids from generation_config.json; (): none).
    Raises BigCodeError for bad options or ids, ContextOverflow when a prompt plus max_new_tokens exceeds n_positions
    (before any work)."""

    def __init__(self, bundle: Bundle, backend):
        self.bundle = bundle
        self.backend = backend
        self._tokenizer = _NOT_LOADED

    @property
    def tokenizer(self):
        """The bundle's tokenizers.Tokenizer (None without one), read on first use: a run on token ids never reads
        tokenizer.json. Raises BundleError for a corrupt one."""
        if self._tokenizer is _NOT_LOADED:
            self._tokenizer = load_tokenizer(self.bundle)
        return self._tokenizer

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

    def decode(self, ids: list[int], show_special: bool = False) -> str:
        """The text of token ids, special tokens left out unless show_special. Raises BigCodeError without a
        tokenizer."""
        if not isinstance(show_special, bool):
            raise BigCodeError(f"show_special={str(show_special)[:40]} must be True or False")
        if self.tokenizer is None:
            raise BigCodeError(f"{self.bundle.path} has no tokenizer.json: it cannot turn ids into text")
        vocab = self.bundle.config["vocab_size"]
        if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
            raise BigCodeError(f"ids={str(ids)[:40]} is not a list of token ids")
        ids = list(ids)
        bad = [t for t in ids if not is_token_id(t, vocab)]
        if bad:
            raise BigCodeError(f"token id {str(bad[0])[:40]} is not a token id in [0, {vocab})")
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=not show_special)

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

    def stream_text(
        self, prompt: str | None, ids: str | list[int] | None = None, show_special: bool = False, **options
    ):
        """One prompt (text, or ids) -> (iterator of printable pieces, stats filled as it runs); ids come back as ids
        (tokenizer.json is not read for them). The text of special
        tokens (<|endoftext|>, FIM tokens) is left out unless show_special; stream() gives every id."""
        token_ids = (
            self.encode(prompt) if prompt is not None else (parse_ids(ids) if isinstance(ids, str) else list(ids))
        )
        stats = GenerationStats()
        events = self.stream([token_ids], stats, **options)
        if prompt is None or self.tokenizer is None:  # ids in, ids out: no tokenizer read
            return (f"{e.token}," if not e.finished else f"{e.token}" for e in events), stats
        decoder = IncrementalDecoder(self.tokenizer, show_special=show_special)
        return (decoder.push(e.token) for e in events), stats

    # --- fill-in-the-middle (runtime/fim.py) ------------------------------------------------------------------
    def fim_prompter(self) -> FimPrompter:
        """The bundle's FIM prompt builder. Raises BigCodeError (one line) when the bundle cannot infill: no
        tokenizer, or no FIM tokens in it (the manifest's `fim` is null)."""
        if getattr(self, "_fim", None) is None:
            record = self.bundle.manifest.fim
            if record is None or self.tokenizer is None:
                raise no_fim_error(str(self.bundle.path), self.tokenizer is not None)
            self._fim = FimPrompter(self.tokenizer, FimTokens.from_json(record))
        return self._fim

    def infill_stops(self, stop_token_ids=None) -> tuple[int, ...]:
        """Where a middle ends: the caller's ids, else the bundle's stop ids plus <file_sep> where it exists."""
        if stop_token_ids is not None:
            return tuple(stop_token_ids)
        return fim_stop_ids(stop_ids(self.bundle.manifest, GenerationOptions()), self.fim_prompter().tokens)

    def stream_infill(self, prefix: str, suffix: str, mode: str | None = None, show_special: bool = False, **options):
        """Fill in the middle between prefix and suffix -> (iterator of the middle's printable pieces, stats filled as
        it runs). The prompt follows the bundle's FIM order (mode psm|spm overrides it); the middle ends at a stop id
        (infill_stops), whose text is never yielded. Options as generate's. Raises BigCodeError when the bundle
        cannot infill or for a bad mode, ContextOverflow when prompt plus max_new_tokens exceed the context."""
        ids = self.fim_prompter().prompt(prefix, suffix, mode)
        stops = self.infill_stops(options.pop("stop_token_ids", None))
        stats = GenerationStats()
        events = self.stream([ids], stats, stop_token_ids=stops, **options)
        decoder = IncrementalDecoder(self.tokenizer, show_special=show_special)
        return (decoder.push(e.token) for e in events if not (e.finished and e.token in stops)), stats

    def infill(self, prefix: str, suffix: str, mode: str | None = None, **options) -> str:
        """The middle's text (see stream_infill), greedy unless sampling options say otherwise."""
        pieces, _ = self.stream_infill(prefix, suffix, mode, **options)
        return "".join(pieces)


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
