"""sha256 of bundle and checkpoint files: what manifests record and what opening a bundle checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB reads: bounded memory for files of any size


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in 4 MiB chunks. Raises OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """{file name: hex sha256} for each path (names, not paths: a bundle is relocatable)."""
    return {path.name: sha256_file(path) for path in paths}
