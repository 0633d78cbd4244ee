"""Per-decode-step overhead of the C ABI against the Python API, on the default model, in one run.

Both sides do the same work: prefill one prompt, then stream greedy tokens with no stop token, timed from the
end of the prefill to the last token. The C side is examples/cpp (built with `make cpp-example`), which times
itself; the Python side iterates runtime.generate.continue_stream. Medians over repeats.

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

from exporter.export import export_bundle
from exporter.progress import quiet
from runtime.api import open_generator
from runtime.generate import continue_stream

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "build" / "example" / "bigcode_generate"
PROMPT = [5, 6, 7, 8]


def python_step_ms(bundle: Path, tokens: int, threads: int) -> float:
    with open_generator(bundle, threads=threads) as g:
        session = g.session()
        options = g.options(max_new_tokens=tokens, stop_token_ids=())
        logits = session.prefill([PROMPT])
        start = time.perf_counter()
        n = sum(1 for _ in continue_stream(session, logits, [PROMPT], options))
        return (time.perf_counter() - start) * 1000 / n


def c_step_ms(bundle: Path, tokens: int) -> float:
    result = subprocess.run([str(EXAMPLE), str(bundle), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                             str(tokens)], capture_output=True, text=True, check=True)
    rate = float(re.search(r"([\d.]+) tokens/s", result.stderr).group(1))
    return 1000 / rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit(f"{EXAMPLE} is missing: run `make cpp-example` first")
    bundle = export_bundle(None, Path(tempfile.mkdtemp()) / "bundle", check=False, progress=quiet)
    python_step_ms(bundle, args.tokens, args.threads)  # warm-up
    c_step_ms(bundle, args.tokens)
    py, c = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both
        py.append(python_step_ms(bundle, args.tokens, args.threads))
        c.append(c_step_ms(bundle, args.tokens))
    py_ms, c_ms = statistics.median(py), statistics.median(c)
    print(f"default model, greedy, {args.tokens} tokens, median of {args.repeats}:")
    print(f"  Python API: {py_ms:.4f} ms per step")
    print(f"  C ABI:      {c_ms:.4f} ms per step")
    print(f"  overhead:   {c_ms - py_ms:+.4f} ms per step ({(c_ms - py_ms) / py_ms * 100:+.1f}% of a step)")


if __name__ == "__main__":
    main()
