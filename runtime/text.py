"""Text in, text out when the bundle carries tokenizer.json (the tokenizers library); token ids otherwise."""

from __future__ import annotations

from bigcode_deploy.runtime.bounded_file import read_bytes
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError, BundleError
from bigcode_deploy.runtime.manifest import MAX_TOKENIZER_BYTES


def load_tokenizer(bundle: Bundle):
    """The bundle's tokenizers.Tokenizer, or None when the bundle has no tokenizer.json.

    Raises BundleError when the file named is missing, leaves the bundle, exceeds MAX_TOKENIZER_BYTES, or is not a
    tokenizer the tokenizers library reads (a corrupt tokenizer.json is a bad bundle)."""
    name = bundle.manifest.tokenizer
    if not name:
        return None
    path = bundle.file(name, "the tokenizer")
    return read_tokenizer(path, BundleError, "re-export the bundle")


def read_tokenizer(path, error: type[BigCodeError], fix: str):
    """The tokenizers.Tokenizer in the file `path`. Raises `error` (one line naming the file, then `fix`) when it
    cannot be read, exceeds MAX_TOKENIZER_BYTES (checked before reading) or is not a tokenizer the tokenizers
    library reads."""
    from tokenizers import Tokenizer

    data = read_bytes(path, limit=MAX_TOKENIZER_BYTES, error=error, fix=fix)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # UnicodeDecodeError, or the plain Exception the tokenizers library raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise error(f"{path} is not a tokenizer the tokenizers library reads ({first}); {fix}") from None


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.strip().rstrip(",").split(",")] if text.strip() else []
    except ValueError:
        raise BigCodeError(f"--ids {text!r} is not a comma-separated list of integers") from None


class IncrementalDecoder:
    """Decodes a growing token list and returns only the new text (a byte-level BPE token can end mid-character).

    show_special: whether special tokens (the tokenizer's added tokens marked special: <|endoftext|>, the FIM tokens)
    are printed; by default their text is left out, as transformers' decode(skip_special_tokens=True) does. The ids
    themselves are not changed: a caller still sees every token id."""

    def __init__(self, tokenizer, show_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = not show_special
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.text = text[len(self.text) :], text
        return new
