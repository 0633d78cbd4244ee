"""Write a bundle directory atomically: build it under a temporary name beside OUT_DIR, then rename.

A failure (or an interrupt) removes the temporary directory, so nothing half-written appears under OUT_DIR's
name; an existing OUT_DIR (allowed only with force) is replaced only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from bigcode_deploy.runtime.errors import BigCodeError


def refuse_existing(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise BigCodeError(f"{out_dir} already exists; choose another OUT_DIR or pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    refuse_existing(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
