"""Build libbigcode_runtime.so, the C ABI of runtime/include/bigcode_runtime.h, with cffi's embedding mode.

    .venv/bin/python -m bigcode_deploy.runtime.capi_build [OUT_DIR]      (default: build/capi)

The library starts CPython on its first call. The embedded interpreter finds this project and its installed
dependencies through the building interpreter's site-packages, recorded here at build time and added with
site.addsitedir (so .pth files, an editable install's among them, take effect); BIGCODE_RUNTIME_PYTHONPATH
(os.pathsep-separated) is searched first when set. The header ships inside the package (package data), so the
library also builds from an installed wheel.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import cffi

HEADER = Path(__file__).resolve().parent / "include" / "bigcode_runtime.h"
MODULE = "_bigcode_runtime_cffi"


def declarations() -> str:
    """The header's declarations, minus what cffi's parser does not take (preprocessor lines, extern "C")."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    keep = [
        line
        for line in text.splitlines()
        if not line.startswith("#") and 'extern "C"' not in line and line.strip() != "}"
    ]
    return "\n".join(keep)


def build(out_dir: Path) -> Path:
    decls = declarations()
    ffi = cffi.FFI()
    function_lines, type_lines = [], []
    for statement in [s.strip() + ";" for s in decls.split(";") if s.strip()]:
        is_function = "(" in statement and not statement.startswith("typedef")
        (function_lines if is_function else type_lines).append(statement)
    ffi.cdef("\n".join(type_lines))
    ffi.embedding_api("\n".join(function_lines))
    libdir = sysconfig.get_config_var("LIBDIR")
    ffi.set_source(
        MODULE,
        f'#include "{HEADER.name}"',
        include_dirs=[str(HEADER.parent)],
        extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [],
    )
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    ffi.embedding_init_code(f"""
import os, site, sys
for _d in {site_dirs!r}:
    site.addsitedir(_d)
_extra = [p for p in os.environ.get("BIGCODE_RUNTIME_PYTHONPATH", "").split(os.pathsep) if p]
for _p in reversed(_extra):
    if _p not in sys.path:
        sys.path.insert(0, _p)
from {MODULE} import ffi, lib
import bigcode_deploy.runtime.capi
bigcode_deploy.runtime.capi.install(ffi, lib)
""")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = ffi.compile(tmpdir=str(out_dir / "tmp"), target="libbigcode_runtime.*", verbose=False)
    built = Path(target)
    final = out_dir / built.name
    built.replace(final)
    return final


if __name__ == "__main__":
    out = build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build") / "capi")
    print(out)
