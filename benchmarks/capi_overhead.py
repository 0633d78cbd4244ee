"""Per-decode-step overhead of the C ABI against the Python API, on the default model, in one run.

Both sides do the same work: prefill one prompt, then stream greedy tokens with no stop token, timed from the
end of the prefill to the last token. The C side is benchmarks/capi_overhead.c (compiled here against the
library `make capi` builds) with a no-op token callback; the Python side iterates
runtime.generate.continue_stream. Medians over repeats, each side in its own process, interleaved.

    .venv/bin/python benchmarks/capi_overhead.py [--tokens 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.generate import continue_stream
from bigcode_deploy.runtime.progress import quiet

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIR = ROOT / "build" / "capi"
PROMPT = [5, 6, 7, 8]


def python_step_ms(bundle: Path, tokens: int, threads: int) -> float:
    """One process (this one), one opened bundle, 3 generations; the last (warm) one counts, as on the C side."""
    with open_generator(bundle, threads=threads) as g:
        options = g.options(max_new_tokens=tokens, stop_token_ids=())
        for _ in range(3):
            session = g.session()
            logits = session.prefill([PROMPT])
            start = time.perf_counter()
            n = sum(1 for _ in continue_stream(session, logits, [PROMPT], options))
            elapsed = time.perf_counter() - start
        return elapsed * 1000 / n


def build_c_bench(out: Path) -> Path:
    binary = out / "capi_overhead"
    subprocess.run(
        [
            "cc",
            "-O2",
            "-std=c11",
            f"-I{ROOT / 'runtime' / 'include'}",
            str(ROOT / "benchmarks" / "capi_overhead.c"),
            f"-L{LIBRARY_DIR}",
            "-lbigcode_runtime",
            f"-Wl,-rpath,{LIBRARY_DIR}",
            "-o",
            str(binary),
        ],
        check=True,
    )
    return binary


def c_step_ms(binary: Path, bundle: Path, tokens: int) -> float:
    """One process, 3 generations; the last (warm) one counts."""
    result = subprocess.run([str(binary), str(bundle), str(tokens), "3"], capture_output=True, text=True, check=True)
    return float(re.findall(r"STEP_MS ([\d.]+)", result.stdout)[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if not (LIBRARY_DIR / "libbigcode_runtime.so").exists():
        raise SystemExit(f"{LIBRARY_DIR / 'libbigcode_runtime.so'} is missing: run `make capi` first")
    work = Path(tempfile.mkdtemp())
    binary = build_c_bench(work)
    bundle = export_bundle(None, work / "bundle", check=False, progress=quiet)
    python_step_ms(bundle, args.tokens, args.threads)  # warm-up
    py, c = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both
        py.append(python_step_ms(bundle, args.tokens, args.threads))
        c.append(c_step_ms(binary, bundle, args.tokens))
    py_ms, c_ms = statistics.median(py), statistics.median(c)
    print(f"default model, greedy, {args.tokens} tokens, median of {args.repeats}:")
    print(f"  Python API: {py_ms:.4f} ms per step")
    print(f"  C ABI:      {c_ms:.4f} ms per step")
    print(f"  overhead:   {c_ms - py_ms:+.4f} ms per step ({(c_ms - py_ms) / py_ms * 100:+.1f}% of a step)")


if __name__ == "__main__":
    main()
