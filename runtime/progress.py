"""Progress lines for long work (export, optimize, engine builds): a callable that takes one message."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(message, flush=True)


def quiet(_message: str) -> None:
    pass


@contextlib.contextmanager
def step(progress: Progress, label: str) -> Iterator[None]:
    """'label ...' before, 'label: done in 1.2s' after."""
    start = time.perf_counter()
    progress(f"{label} ...")
    yield
    progress(f"{label}: done in {time.perf_counter() - start:.1f}s")
