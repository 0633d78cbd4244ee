"""The speed comparison, in one run, on one random-weight tiny_starcoder-shaped checkpoint.

Runners: this runtime on the ort bundle (last-token logits), the portable bundle, the int8 and int4 bundles;
the torch reference with its own KV cache; transformers 4.53 eager `generate`; and the memory-bound ceiling
(GEMV read bandwidth measured in this run, over the weight bytes one decode step reads). Cases: context 128 and
2048, batch 1 and 8. Writes benchmarks/results/<name>.md (table) and .png (per-token latency against context),
and prints the table. Medians over repeats after a warm-up; ratios are within this run only.

    .venv/bin/python benchmarks/compare.py [--cases 128x1,2048x1,128x8,2048x8] [--new-tokens 32] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.bench import bench_bundle
from bigcode_deploy.runtime.progress import quiet
from bigcode_deploy.workflows.backends import open_any_backend
from bigcode_deploy.workflows.optimize import optimize_bundle

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_checkpoint(path: Path, n_layer: int) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(
        vocab_size=49152,
        n_positions=8192,
        n_embd=768,
        n_layer=n_layer,
        n_head=12,
        n_inner=3072,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    transformers.GPTBigCodeForCausalLM(config).save_pretrained(path)
    return path


def step_shapes(checkpoint: Path) -> list[tuple[int, int]]:
    """(K, N) of every weight one decode step multiplies by: 4 per layer, then the lm_head."""
    c = json.loads((checkpoint / "config.json").read_text())
    E, inner, D = c["n_embd"], c["n_inner"], c["n_embd"] // c["n_head"]
    return [(E, E + 2 * D), (E, E), (E, inner), (inner, E)] * c["n_layer"] + [(E, c["vocab_size"])]


def model_shaped_gemv_gbs(shapes: list[tuple[int, int]], threads: int, repeats: int = 7) -> float:
    """ONNX Runtime MatMuls of a vector by each weight of one step, in one graph: the bytes one step must read,
    read by the same kernels, with none of the model's other work."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], {}, []
    for i, (K, N) in enumerate(shapes):
        if K not in inputs:
            inputs[K] = helper.make_tensor_value_info(f"x{K}", TensorProto.FLOAT, [1, K])
        inits.append(
            helper.make_tensor(
                f"w{i}", TensorProto.FLOAT, [K, N], rng.standard_normal((K, N), dtype=np.float32).tobytes(), raw=True
            )
        )
        nodes.append(helper.make_node("MatMul", [f"x{K}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]))
    model = helper.make_model(
        helper.make_graph(nodes, "step", list(inputs.values()), outputs, inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, inits
    feeds = {f"x{K}": np.ones((1, K), dtype=np.float32) for K in inputs}
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return sum(K * N * 4 for K, N in shapes) / statistics.median(times) / 1e9


def gemv_bandwidth_gbs(threads: int, megabytes: int = 384, repeats: int = 15) -> dict[str, float]:
    """Read bandwidth of a float32 vector-matrix product, the kernel shape of batch-1 decode, by three kernels.

    The ceiling uses the fastest of these and of model_shaped_gemv_gbs (seen here: numpy's OpenBLAS sgemv and
    ORT's MatMul 30-33 GB/s on one 384 MB matrix, torch.mv ~12).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    K = 768
    N = megabytes * (1 << 20) // (4 * K)
    w = np.random.default_rng(0).standard_normal((K, N), dtype=np.float32)  # (K, N): MatMul's weight layout
    x = np.ones((1, K), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor("W", TensorProto.FLOAT, [K, N], w.tobytes(), raw=True)],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    tw, tx = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(x[0])
    kernels = {
        "numpy x@W": lambda: x @ w,
        "onnxruntime MatMul": lambda: session.run(None, {"x": x}),
        "torch.mv": lambda: torch.mv(tw, tx),
    }
    out = {}
    for name, fn in kernels.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = w.nbytes / statistics.median(times) / 1e9
    return out


def bytes_per_step(checkpoint: Path, scheme: str) -> float:
    """Weight bytes one decode step reads: every Linear weight and the lm_head (embedding rows are a gather)."""
    config = json.loads((checkpoint / "config.json").read_text())
    E, L, V, inner = config["n_embd"], config["n_layer"], config["vocab_size"], config["n_inner"]
    D = E // config["n_head"]
    matmul_params = L * (E * (E + 2 * D) + E * E + 2 * E * inner) + E * V
    per_param = {"fp32": 4.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32}[scheme]  # + one fp32 scale per block of 32
    return matmul_params * per_param


def transformers_eager(
    checkpoint: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int, threads: int
) -> dict:
    """transformers' own generate(); a logits processor stamps the time of each step (the first stamp ends the
    prefill), so one call gives the prefill time and every decode step's time."""
    import transformers

    torch.set_num_threads(threads)
    model = transformers.GPTBigCodeForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    class Stamp(transformers.LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def timed() -> tuple[float, list[float]]:
        stamp = Stamp()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=transformers.LogitsProcessorList([stamp]),
            )
        return stamp.times[0] - start, list(np.diff(stamp.times))

    if batch * prompt_len <= 4096:
        timed()  # warm-up
    prefill, rates, steps = [], [], []
    for _ in range(repeats):
        p, step_times = timed()
        prefill.append(p)
        rates.append(batch * len(step_times) / sum(step_times))
        steps.extend(step_times)
    return {
        "prefill_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(rates),
        "token_latency_ms": statistics.median(steps) * 1000,
    }


def run_case(
    runner: str, bundles: dict, checkpoint: Path, batch: int, context: int, new_tokens: int, repeats: int, threads: int
) -> dict:
    prompt = context - new_tokens
    if runner == "transformers eager":
        return transformers_eager(checkpoint, batch, prompt, new_tokens, repeats, threads)
    bundle, backend = bundles[runner]
    warmup = 0 if batch * prompt > 4096 else 1  # a minute-long prefill is its own warm-up for the decode steps
    r = bench_bundle(
        bundle,
        prompt_len=prompt,
        new_tokens=new_tokens,
        batch=batch,
        backend=backend,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        opener=functools.partial(open_any_backend, model_dir=checkpoint),
    )
    return {"prefill_s": r.prefill_s, "decode_tok_s": r.decode_tok_s, "token_latency_ms": r.token_latency_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="128x1,2048x1,128x8,2048x8", help="CONTEXTxBATCH,...")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=20, help="tiny_starcoder has 20")
    parser.add_argument("--latency-contexts", default="128,512,1024,2048")
    parser.add_argument("--name", default="tiny_starcoder_cpu")
    parser.add_argument("--quick", action="store_true", help="2 layers, context 128 only: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.cases, args.latency_contexts, args.repeats, args.new_tokens = 2, "128x1", "128,256", 1, 8
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bigcode-bench-"))
    log(f"writing a random-weight tiny_starcoder-shaped checkpoint ({args.layers} layers) with transformers ...")
    checkpoint = make_checkpoint(work / "checkpoint", args.layers)
    log("exporting and optimizing bundles ...")
    portable = export_bundle(checkpoint, work / "portable", check=False, progress=quiet)
    bundles = {
        "ours ort fp32": (
            optimize_bundle(portable, work / "ort", target="ort", last_token_logits=True, progress=quiet),
            "ort",
        ),
        "ours portable fp32": (portable, "ort"),
        "ours ort int8": (
            optimize_bundle(
                portable,
                work / "int8",
                target="ort",
                last_token_logits=True,
                quantize="int8",
                check=False,
                progress=quiet,
            ),
            "ort",
        ),
        "ours ort int4": (
            optimize_bundle(
                portable,
                work / "int4",
                target="ort",
                last_token_logits=True,
                quantize="int4",
                check=False,
                progress=quiet,
            ),
            "ort",
        ),
        "torch reference (KV cache)": (portable, "torch"),
    }
    runners = [*bundles, "transformers eager"]

    log(f"measuring GEMV read bandwidth ({args.threads} threads) ...")
    kernels = gemv_bandwidth_gbs(args.threads)
    kernels["onnxruntime MatMuls, one step's weight shapes"] = model_shaped_gemv_gbs(
        step_shapes(checkpoint), args.threads
    )
    bandwidth = max(kernels.values())
    ceilings = {s: bandwidth * 1e9 / bytes_per_step(checkpoint, s) for s in ("fp32", "int8", "int4")}

    rows = []
    for context, batch in cases:
        # The big prefills (e.g. 8 x 2048 tokens, about a minute each here) get one timed repeat.
        repeats = 1 if batch * context > 4096 else args.repeats
        for runner in runners:
            log(f"  context {context}, batch {batch}: {runner} ...")
            result = run_case(runner, bundles, checkpoint, batch, context, args.new_tokens, repeats, args.threads)
            rows.append({"context": context, "batch": batch, "runner": runner, **result})
    curve = {}
    for runner in ("ours ort fp32", "ours ort int8", "ours ort int4", "transformers eager"):
        for context in (int(c) for c in args.latency_contexts.split(",")):
            log(f"  latency at context {context}: {runner} ...")
            r = run_case(runner, bundles, checkpoint, 1, context, min(16, args.new_tokens), 1, args.threads)
            curve.setdefault(runner, []).append((context, r["token_latency_ms"]))

    cpu = subprocess.run(
        ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True
    ).stdout.strip()
    header = [
        f"# Decode and prefill speed: {args.name}",
        "",
        f"Machine: {cpu or platform.processor()}, {args.threads} threads; torch {torch.__version__}; "
        f"onnxruntime {__import__('onnxruntime').__version__}; random-weight GPTBigCode with tiny_starcoder shapes "
        f"({args.layers} layers, width 768, 12 heads MQA, vocabulary 49152); greedy, {args.new_tokens} new tokens "
        f"(context = prompt + new tokens); medians of {args.repeats} repeats after a warm-up (1 repeat where batch x "
        f"context > 4096). Decode tokens/s counts every row of the batch.",
        "",
        "GEMV read bandwidth measured in this run (float32 vector x matrix; one 384 MB matrix, or every weight of "
        "one decode step): "
        + ", ".join(f"{name} {gbs:.1f} GB/s" for name, gbs in kernels.items())
        + f"; the fastest, {bandwidth:.1f} GB/s, sets the memory-bound ceiling for batch-1 decode "
        f"(bandwidth / weight bytes one step reads): fp32 {ceilings['fp32']:.1f}, int8 {ceilings['int8']:.1f}, "
        f"int4 {ceilings['int4']:.1f} tokens/s.",
        "",
        "| context | batch | runner | prefill (s) | decode (tokens/s) | ms / step | vs transformers decode "
        "| vs ceiling (b=1) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines = []
    for row in rows:
        ref = next(
            r
            for r in rows
            if r["context"] == row["context"] and r["batch"] == row["batch"] and r["runner"] == "transformers eager"
        )
        scheme = "int8" if "int8" in row["runner"] else "int4" if "int4" in row["runner"] else "fp32"
        vs_ceiling = f"{row['decode_tok_s'] / ceilings[scheme]:.2f}" if row["batch"] == 1 else ""
        lines.append(
            f"| {row['context']} | {row['batch']} | {row['runner']} | {row['prefill_s']:.3f} | "
            f"{row['decode_tok_s']:.1f} | {row['token_latency_ms']:.1f} | "
            f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x | {vs_ceiling} |"
        )
    curve_lines = [
        "",
        "Per-token decode latency (ms, batch 1) against context length:",
        "",
        "| runner | " + " | ".join(str(c) for c, _ in next(iter(curve.values()))) + " |",
        "| --- |" + " ---: |" * len(next(iter(curve.values()))),
    ]
    for runner, points in curve.items():
        curve_lines.append(f"| {runner} | " + " | ".join(f"{ms:.1f}" for _, ms in points) + " |")
    table = "\n".join(header + lines + curve_lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"bandwidth_gbs": kernels, "ceilings": ceilings, "rows": rows, "curve": curve}, indent=2) + "\n"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for runner, points in curve.items():
            ax.plot([c for c, _ in points], [ms for _, ms in points], marker="o", label=runner)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode latency per token (ms), batch 1")
        ax.set_title(f"{args.name}: per-token latency vs context")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    print(table)


if __name__ == "__main__":
    main()
