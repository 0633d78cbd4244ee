"""Files read as untrusted input with bounded memory and one-line errors: a checkpoint's config.json, shard index,
generation_config.json and tokenizer files, a bundle's manifest.json and tokenizer.json, a source file given to
`generate --file`.

What is refused, each with one line naming the file: a missing file, a directory, a symlink loop, a FIFO, socket or
device (reading one would block or never end), a file larger than its bound (checked before reading and again while
reading); for JSON also bytes that are not UTF-8, text that is not JSON, nesting deeper than the JSON parser takes,
an integer literal longer than Python converts, and NaN or Infinity anywhere (JSON has neither; Python's parser
accepts them, and 1e999 reads as inf).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from bigcode_deploy.runtime.errors import BigCodeError


def read_bytes(path: str | Path, *, limit: int, error: type[BigCodeError], fix: str) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes. Raises `error` (one line: the file, what is
    wrong, then `fix`, what to do) for a missing, unreadable, non-regular or too large file."""
    path = Path(path)
    try:
        info = os.stat(path)  # follows symlinks: a loop is ELOOP here
    except FileNotFoundError:
        raise error(f"{path} not found: {fix}") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or type(exc).__name__}): {fix}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path} is a directory, not a file: {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file (a FIFO, socket or device): {fix}")
    if info.st_size > limit:
        raise error(f"{path} holds {info.st_size} bytes, more than the {limit} this file may hold: {fix}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since stat
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or type(exc).__name__}): {fix}") from None
    if len(data) > limit:
        raise error(f"{path} holds more than the {limit} bytes this file may hold: {fix}")
    return data


def read_json(path: str | Path, *, limit: int, error: type[BigCodeError], fix: str) -> Any:
    """The JSON value in `path`, a regular file of at most `limit` bytes. Raises `error` (one line: the file, what is
    wrong, then `fix`, what to do) for every kind of bad file listed in this module's docstring."""
    path = Path(path)
    data = read_bytes(path, limit=limit, error=error, fix=fix)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text: {fix}") from None
    except RecursionError:
        raise error(f"{path} nests arrays or objects too deeply to read: {fix}") from None
    except ValueError as exc:  # JSONDecodeError, and an integer literal longer than int() converts
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise error(f"{path} is not valid JSON ({reason}): {fix}") from None
    where = first_non_finite(value)
    if where is not None:
        shown = where[:80].encode("unicode_escape").decode("ascii")  # a key may hold any character
        raise error(
            f"{path}: {f'field {shown}' if shown else 'the value'} is NaN or infinite, which JSON does not allow: {fix}"
        )
    return value


def first_non_finite(value: Any) -> str | None:
    """The key path (`a.b[2]`; "" for the value itself) of the first NaN or infinite float inside a parsed JSON value
    or a dataclass of them, or None. Iterative: a value as deep as the parser allows is walked without recursion."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            item = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
        if isinstance(item, dict):
            stack.extend((f"{where}.{key}" if where else str(key), v) for key, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None
