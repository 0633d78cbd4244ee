"""Build libbigcode_runtime.so, the C ABI of runtime/include/bigcode_runtime.h, with cffi's embedding mode.

    .venv/bin/python -m bigcode_deploy.runtime.capi_build [OUT_DIR]      (default: build/capi)

The library starts CPython on its first call. The embedded interpreter finds this project and its installed
dependencies through the building interpreter's site-packages, recorded here at build time and added with
site.addsitedir (so .pth files, an editable install's among them, take effect); BIGCODE_RUNTIME_PYTHONPATH
(os.pathsep-separated) is searched first when set. The header ships inside the package (package data), so the
library also builds from an installed wheel.

Start failure. When the embedded interpreter cannot start (a moved virtual environment, a package that fails to
import), cffi does not call the Python function and returns a zero-filled result instead, and 0 is BCR_OK. So each
entry point of the header is a small C function, generated here from the header's prototype, that first calls
cffi's `cffi_start_python()` (-1 when the start failed, for the life of the process) and then returns
BCR_ERR_RUNTIME_UNAVAILABLE (void functions: do nothing), or calls its Python implementation, an
`extern "Python"` function named `bcr_py_<name>` (static: not exported). The start code records why it failed
(`bcr_internal_start_failed`), which bcr_last_error returns. bcr_version and bcr_sampling_options_default are plain
C: they work without Python. A Python implementation that raises despite capi.py's own handling returns
BCR_ERR_INTERNAL (`ffi.def_extern(error=...)`), never the zero that means BCR_OK.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import cffi

from bigcode_deploy.runtime.version import __version__

HEADER = Path(__file__).resolve().parent / "include" / "bigcode_runtime.h"
MODULE = "_bigcode_runtime_cffi"
PY_PREFIX = "bcr_py_"  # the Python implementation of bcr_NAME is bcr_py_NAME (capi.py defines them)
PURE_C = ("bcr_version", "bcr_sampling_options_default")  # no Python behind them

# C helpers the generated entry points and the start code use (static: not exported).
C_SUPPORT = r"""
#include <stdio.h>
#include <string.h>

static char bcr_start_error[1024] =
    "the embedded Python runtime did not start (Python itself failed to initialize; cffi printed why on stderr)";

/* Called by the start code (Python) when it fails, before cffi marks the start as failed. */
static void bcr_internal_start_failed(const char *message) {
    snprintf(bcr_start_error, sizeof bcr_start_error, "%s", message);
}

CFFI_DLLEXPORT const char *bcr_version(void) { return "@VERSION@"; }

CFFI_DLLEXPORT void bcr_sampling_options_default(bcr_sampling_options *options) {
    if (options == NULL) return;
    memset(options, 0, sizeof *options);
    options->max_new_tokens = 32;
    options->temperature = 0.0f;
    options->top_k = 0;
    options->top_p = 1.0f;
    options->repetition_penalty = 1.0f;
    options->stop_token_ids = NULL;
    options->num_stop_token_ids = 0;
}

static const char *bcr_py_last_error(void);

CFFI_DLLEXPORT const char *bcr_last_error(void) {
    const char *message;
    if (cffi_start_python() != 0) return bcr_start_error;
    message = bcr_py_last_error();
    return message != NULL ? message : "";
}
"""


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


def split_declarations() -> tuple[list[str], list[tuple[str, str, str]]]:
    """(type statements, [(return type, name, parameter list)] of the header's functions)."""
    types, functions = [], []
    for statement in [" ".join(s.split()) for s in declarations().split(";") if s.strip()]:
        if "(" in statement and not statement.startswith("typedef"):
            match = re.fullmatch(r"(.+?)\b(bcr_\w+)\s*\((.*)\)", statement)
            if match is None:
                raise ValueError(f"cannot read the prototype {statement!r} in {HEADER.name}")
            functions.append((match.group(1).strip(), match.group(2), match.group(3).strip()))
        else:
            types.append(statement + ";")
    return types, functions


def parameter_names(parameters: str) -> list[str]:
    if parameters in ("", "void"):
        return []
    return [re.findall(r"\w+", p)[-1] for p in parameters.split(",")]


def entry_point(result: str, name: str, parameters: str) -> str:
    """The exported C function for bcr_NAME: start Python (or fail with a status), then call bcr_py_NAME."""
    impl = PY_PREFIX + name.removeprefix("bcr_")
    call = f"{impl}({', '.join(parameter_names(parameters))})"
    if result == "void":
        on_failure, body = "return;", f"{call};"
    elif result == "bcr_status":
        on_failure, body = "return BCR_ERR_RUNTIME_UNAVAILABLE;", f"return {call};"
    else:
        raise ValueError(f"{name} returns {result}: only bcr_status and void entry points are generated")
    return (
        f"static {result} {impl}({parameters});\n"
        f"CFFI_DLLEXPORT {result} {name}({parameters}) {{\n"
        f"    if (cffi_start_python() != 0) {on_failure}\n"
        f"    {body}\n"
        "}\n"
    )


def build(out_dir: Path) -> Path:
    types, functions = split_declarations()
    ffi = cffi.FFI()
    ffi.cdef("\n".join(types))
    python_side = [f for f in functions if f[1] not in PURE_C]
    ffi.cdef(
        "\n".join(
            f'extern "Python" {result} {PY_PREFIX}{name.removeprefix("bcr_")}({parameters});'
            for result, name, parameters in python_side
        )
        + "\nvoid bcr_sampling_options_default(bcr_sampling_options *options);"
        + "\nvoid bcr_internal_start_failed(const char *message);"
    )
    ffi.embedding_api("")  # the exported functions are the C ones below, not cffi's
    generated = [entry_point(*f) for f in python_side if f[1] != "bcr_last_error"]
    libdir = sysconfig.get_config_var("LIBDIR")
    ffi.set_source(
        MODULE,
        f'#include "{HEADER.name}"\n' + C_SUPPORT.replace("@VERSION@", __version__) + "\n".join(generated),
        include_dirs=[str(HEADER.parent)],
        extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [],
    )
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    ffi.embedding_init_code(f"""
import os, site, sys
from {MODULE} import ffi, lib
try:
    for _d in {site_dirs!r}:
        site.addsitedir(_d)
    _extra = [p for p in os.environ.get("BIGCODE_RUNTIME_PYTHONPATH", "").split(os.pathsep) if p]
    for _p in reversed(_extra):
        if _p not in sys.path:
            sys.path.insert(0, _p)
    import bigcode_deploy.runtime.capi
    bigcode_deploy.runtime.capi.install(ffi, lib)
except BaseException as _exc:
    _why = " ".join(f"{{type(_exc).__name__}}: {{_exc}}".split())
    lib.bcr_internal_start_failed(
        f"the embedded Python runtime did not start: {{_why}} (Python {{sys.version.split()[0]}} at "
        f"{{sys.prefix}}; cffi printed the traceback on stderr)".encode("utf-8", "replace")
    )
    raise
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
