"""Build the C ABI's library and a C program linked against it (one helper for every C test)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCES = Path(__file__).parent


def build_program(root: Path, source: str) -> tuple[Path, Path]:
    """(libbigcode_runtime.so, the binary of tests/capi/<source>), both built under root with the machine's cc."""
    from bigcode_deploy.runtime.capi_build import HEADER, build

    library = build(root / "lib")
    binary = root / Path(source).stem
    subprocess.run(
        ["cc", "-std=c11", "-Wall", "-Werror", f"-I{HEADER.parent}", str(SOURCES / source), f"-L{library.parent}"]
        + ["-lbigcode_runtime", f"-Wl,-rpath,{library.parent}", "-o", str(binary)],
        check=True,
    )
    return library, binary
