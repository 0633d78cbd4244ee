"""Fill-in-the-middle: the FIM special tokens of a tokenizer, and prompts in PSM and SPM order as token ids.

Torch-free. Two spellings exist in the GPTBigCode family: StarCoder's underscored `<fim_prefix>` ... and SantaCoder's
hyphenated `<fim-prefix>` .... Prompts are assembled from ids, never by pasting token spellings into text, so the
tokenizer can neither split a FIM token nor add a BOS or a space where two parts meet:

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle>     -> the model writes the middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix     -> the model continues the prefix with the middle

(SPM is the order StarCoder and SantaCoder were trained on, bigcode-project/Megatron-LM's permute().) The middle
ends at eos, or at <file_sep> where the vocabulary has it; what is returned is the middle alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bigcode_deploy.runtime.errors import BigCodeError, BundleError

# The four FIM roles, in StarCoder's vocabulary order (ids 1..4 after <|endoftext|>).
FIM_ROLES = ("prefix", "middle", "suffix", "pad")
STARCODER_FIM = {role: f"<fim_{role}>" for role in FIM_ROLES}
SANTACODER_FIM = {role: f"<fim-{role}>" for role in FIM_ROLES}
SPELLINGS = {"starcoder": STARCODER_FIM, "santacoder": SANTACODER_FIM}
FILE_SEP = "<file_sep>"  # StarCoder2: ends a file, so it also ends a middle
FIM_MODES = ("psm", "spm")
DEFAULT_FIM_MODE = "psm"
DEFAULT_CURSOR = "<CURSOR>"  # the marker `generate --file` splits a file at


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's FIM token ids (pad and file_sep: None where absent), its spelling and the bundle's order."""

    prefix: int
    middle: int
    suffix: int
    pad: int | None
    file_sep: int | None
    spelling: str  # "starcoder" | "santacoder"
    mode: str = DEFAULT_FIM_MODE  # "psm" | "spm"

    def to_json(self) -> dict[str, Any]:
        """The manifest's `fim` record."""
        return {
            "spelling": self.spelling,
            "tokens": {"prefix": self.prefix, "middle": self.middle, "suffix": self.suffix, "pad": self.pad},
            "file_sep": self.file_sep,
            "mode": self.mode,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FimTokens:
        t = record["tokens"]
        spelling, mode = record["spelling"], record["mode"]
        return cls(t["prefix"], t["middle"], t["suffix"], t["pad"], record["file_sep"], spelling, mode)


def find_fim_tokens(tokenizer, mode: str = DEFAULT_FIM_MODE) -> FimTokens | None:
    """The FIM tokens of a tokenizers.Tokenizer (StarCoder's spelling first, then SantaCoder's), or None when it has
    neither complete set of prefix, middle and suffix. Raises BigCodeError for a mode outside FIM_MODES."""
    check_mode(mode)
    for spelling, names in SPELLINGS.items():
        ids = {role: tokenizer.token_to_id(names[role]) for role in FIM_ROLES}
        if all(ids[role] is not None for role in ("prefix", "middle", "suffix")):
            return FimTokens(
                ids["prefix"], ids["middle"], ids["suffix"], ids["pad"], tokenizer.token_to_id(FILE_SEP), spelling, mode
            )
    return None


def check_mode(mode: str) -> str:
    if mode not in FIM_MODES:
        raise BigCodeError(f"FIM mode {mode!r} is not one of {', '.join(FIM_MODES)}; choose psm (default) or spm")
    return mode


def check_fim_record(record: Any, vocab_size: int, bad) -> None:
    """The manifest's `fim` field: null, or {spelling, tokens: {prefix, middle, suffix, pad}, file_sep, mode} with
    ids inside the vocabulary. bad(field, what) builds the BundleError to raise."""
    if record is None:
        return

    def ok_id(v: Any, nullable: bool = False) -> bool:
        return (v is None and nullable) or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size)

    if (
        not isinstance(record, dict)
        or set(record) != {"spelling", "tokens", "file_sep", "mode"}
        or record["spelling"] not in SPELLINGS
        or record["mode"] not in FIM_MODES
        or not isinstance(record["tokens"], dict)
        or set(record["tokens"]) != {"prefix", "middle", "suffix", "pad"}
        or not all(ok_id(record["tokens"][r]) for r in ("prefix", "middle", "suffix"))
        or not ok_id(record["tokens"]["pad"], nullable=True)
        or not ok_id(record["file_sep"], nullable=True)
    ):
        raise bad(
            "fim",
            f"is not a FIM record (spelling: {' or '.join(SPELLINGS)}, tokens: prefix/middle/suffix/pad ids in "
            f"[0, {vocab_size}), file_sep: id or null, mode: {' or '.join(FIM_MODES)})",
        )


def no_fim_error(where: str, has_tokenizer: bool) -> BigCodeError:
    """The one line said when infilling is asked of a bundle that cannot do it."""
    if not has_tokenizer:
        return BigCodeError(f"{where} has no tokenizer.json, so no FIM tokens; infilling needs a bundle with one")
    return BigCodeError(
        f"{where}'s tokenizer has no FIM tokens ({STARCODER_FIM['prefix']} ... or {SANTACODER_FIM['prefix']} ...): "
        "this model was not trained to infill; use --prompt alone for a left-to-right completion"
    )


class FimPrompter:
    """Builds FIM prompts for one tokenizer: encode each part alone (no special tokens, no added space), then join
    ids in the bundle's order. Raises BigCodeError at construction for a tokenizer that inserts a space before
    every text (add_prefix_space): the parts would not join as the text does."""

    def __init__(self, tokenizer, tokens: FimTokens):
        self.tokenizer = tokenizer
        self.tokens = tokens
        probe = "x"
        if tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False).ids) != probe:
            raise BundleError(
                "the bundle's tokenizer adds a space before each text (add_prefix_space): a FIM prompt built from it "
                "would insert spaces where prefix and suffix meet; re-export with a tokenizer that does not"
            )
        # Special tokens the tokenizer's post-processor puts before a text (a BOS): once, at the prompt's start.
        with_special = tokenizer.encode(probe).ids
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        self.lead = with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []

    def encode(self, text: str) -> list[int]:
        """One part's ids, without special tokens. Raises BigCodeError for text that is not a str of valid UTF-8."""
        if not isinstance(text, str):
            raise BigCodeError(f"a FIM part must be text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BigCodeError("the prefix or suffix is not valid UTF-8 text") from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def prompt(self, prefix: str, suffix: str, mode: str | None = None) -> list[int]:
        """The prompt's ids in `mode` (None: the bundle's); see the module docstring for both orders."""
        return assemble(self.tokens, self.encode(prefix), self.encode(suffix), mode, self.lead)


def assemble(
    tokens: FimTokens, prefix: list[int], suffix: list[int], mode: str | None = None, lead: list[int] | None = None
) -> list[int]:
    """A FIM prompt from already encoded parts: PSM or SPM (None: tokens.mode), `lead` (a BOS) at the start only."""
    t, mode = tokens, check_mode(mode or tokens.mode)
    if mode == "psm":
        body = [t.prefix, *prefix, t.suffix, *suffix, t.middle]
    else:
        body = [t.prefix, t.suffix, *suffix, t.middle, *prefix]
    return [*(lead or []), *body]


def fim_stop_ids(eos_ids: list[int] | set[int] | tuple[int, ...], tokens: FimTokens) -> tuple[int, ...]:
    """Where a middle ends: every eos id, and <file_sep> where the vocabulary has it."""
    return tuple(sorted({*eos_ids, *([tokens.file_sep] if tokens.file_sep is not None else [])}))


def middle_ids(generated: list[int], stops: tuple[int, ...] | set[int]) -> list[int]:
    """The generated ids up to (not including) the first stop id: the middle alone."""
    for i, token in enumerate(generated):
        if token in stops:
            return generated[:i]
    return list(generated)


def split_at_cursor(text: str, cursor: str, where: str) -> tuple[str, str]:
    """(prefix, suffix) of a file's text around its one cursor marker. Raises BigCodeError unless the marker occurs
    exactly once."""
    if not cursor:
        raise BigCodeError("--cursor is empty; give the marker that stands where the middle goes")
    count = text.count(cursor)
    if count != 1:
        raise BigCodeError(
            f"{where} contains the cursor marker {cursor!r} {count} times; put it exactly once where the middle goes"
        )
    prefix, suffix = text.split(cursor)
    return prefix, suffix


def fim_record(tokenizer, mode: str = DEFAULT_FIM_MODE) -> dict[str, Any] | None:
    """The manifest's `fim` record for a tokenizers.Tokenizer (None when it has no FIM tokens)."""
    tokens = find_fim_tokens(tokenizer, mode)
    return None if tokens is None else tokens.to_json()
