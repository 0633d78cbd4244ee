"""Text in, text out when the bundle carries tokenizer.json (the tokenizers library); token ids otherwise."""

from __future__ import annotations

from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError


def load_tokenizer(bundle: Bundle):
    """The bundle's tokenizers.Tokenizer, or None when the bundle has no tokenizer.json."""
    name = bundle.manifest.tokenizer
    if not name:
        return None
    from tokenizers import Tokenizer

    path = bundle.path / name
    if not path.is_file():
        raise BigCodeError(f"{path} is named in manifest.json but missing from the bundle; re-export it")
    return Tokenizer.from_file(str(path))


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.strip().rstrip(",").split(",")] if text.strip() else []
    except ValueError:
        raise BigCodeError(f"--ids {text!r} is not a comma-separated list of integers") from None


class IncrementalDecoder:
    """Decodes a growing token list and returns only the new text (a byte-level BPE token can end mid-character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.text = text[len(self.text) :], text
        return new
