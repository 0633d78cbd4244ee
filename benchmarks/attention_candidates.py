"""Which attention formulation ONNX Runtime runs fastest on this CPU, for one decode step of one layer.

Candidates, each with its own cache update, at tiny_starcoder's shapes (12 heads x 64, one K/V head):
- folded:   GPTBigCode's own form (the ort target keeps it): Concat(past K|V, new) -> Split -> MatMul with the
            heads folded into the query rows -> fp32 masked Softmax -> MatMul.
- gqa:      com.microsoft GroupQueryAttention, kv_num_heads=1, past/present BNSH.
- attn23:   ONNX Attention (opset 23), kv_num_heads=1, past/present, explicit boolean mask.
Prints the median latency per candidate and past length, and ratios against `folded`, measured in one run.

    .venv/bin/python benchmarks/attention_candidates.py [--past 128 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

H, D, B = 12, 64, 1
E = H * D
F = TensorProto.FLOAT


def folded() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Concat", ["past", "new_kv"], ["present"], axis=1),  # (B, S, 2D)
        helper.make_node("Split", ["present"], ["k", "v"], axis=-1, num_outputs=2),
        helper.make_node("Reshape", ["q", "rows_shape"], ["q_rows"]),  # (B, H, D): heads folded into rows
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q_rows", "k_t"], ["scores"]),  # (B, H, S)
        helper.make_node("Where", ["mask", "scores", "neg"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out_rows"]),  # (B, H, D)
        helper.make_node("Reshape", ["out_rows", "out_shape"], ["out"]),
    ]
    inits = [
        helper.make_tensor("rows_shape", TensorProto.INT64, [3], [B, H, D]),
        helper.make_tensor("out_shape", TensorProto.INT64, [3], [B, 1, E]),
        helper.make_tensor("neg", F, [], [float(np.finfo(np.float32).min)]),
    ]
    graph = helper.make_graph(
        nodes,
        "folded",
        [
            helper.make_tensor_value_info("q", F, [B, 1, E]),
            helper.make_tensor_value_info("new_kv", F, [B, 1, 2 * D]),
            helper.make_tensor_value_info("past", F, [B, "P", 2 * D]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, "S"]),
        ],
        [helper.make_tensor_value_info("out", F, None), helper.make_tensor_value_info("present", F, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def gqa() -> onnx.ModelProto:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_len"],
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=1,
    )
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("q", F, [B, 1, E]),
            helper.make_tensor_value_info("k", F, [B, 1, D]),
            helper.make_tensor_value_info("v", F, [B, 1, D]),
            helper.make_tensor_value_info("past_key", F, [B, 1, "P", D]),
            helper.make_tensor_value_info("past_value", F, [B, 1, "P", D]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
            helper.make_tensor_value_info("total_len", TensorProto.INT32, []),
        ],
        [helper.make_tensor_value_info(n, F, None) for n in ("out", "present_key", "present_value")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )


def attn23() -> onnx.ModelProto:
    node = helper.make_node(
        "Attention",
        ["q", "k", "v", "mask", "past_key", "past_value"],
        ["out", "present_key", "present_value"],
        q_num_heads=H,
        kv_num_heads=1,
    )
    graph = helper.make_graph(
        [node],
        "attn23",
        [
            helper.make_tensor_value_info("q", F, [B, 1, E]),
            helper.make_tensor_value_info("k", F, [B, 1, D]),
            helper.make_tensor_value_info("v", F, [B, 1, D]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, "S"]),
            helper.make_tensor_value_info("past_key", F, [B, 1, "P", D]),
            helper.make_tensor_value_info("past_value", F, [B, 1, "P", D]),
        ],
        [helper.make_tensor_value_info(n, F, None) for n in ("out", "present_key", "present_value")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def feeds(name: str, past: int, rng) -> dict[str, np.ndarray]:
    q = rng.standard_normal((B, 1, E), dtype=np.float32)
    if name == "folded":
        return {
            "q": q,
            "new_kv": rng.standard_normal((B, 1, 2 * D), dtype=np.float32),
            "past": rng.standard_normal((B, past, 2 * D), dtype=np.float32),
            "mask": np.ones((B, 1, past + 1), dtype=bool),
        }
    kv = {
        "k": rng.standard_normal((B, 1, D), dtype=np.float32),
        "v": rng.standard_normal((B, 1, D), dtype=np.float32),
        "past_key": rng.standard_normal((B, 1, past, D), dtype=np.float32),
        "past_value": rng.standard_normal((B, 1, past, D), dtype=np.float32),
    }
    if name == "gqa":
        return {
            "q": q,
            **kv,
            "seqlens_k": np.full((B,), past, dtype=np.int32),
            "total_len": np.array(past + 1, dtype=np.int32),
        }
    return {"q": q, **kv, "mask": np.ones((1, past + 1), dtype=bool)}


def median_ms(session, inputs, repeats: int) -> float:
    for _ in range(5):
        session.run(None, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--past", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    builders = {"folded": folded, "gqa": gqa, "attn23": attn23}
    print(
        f"one decode step, one layer, {H} heads x {D}, one K/V head, batch {B}, {args.threads} threads "
        f"(onnxruntime {ort.__version__}); median of {args.repeats}"
    )
    print(f"{'past':>6} " + " ".join(f"{n:>16}" for n in builders))
    for past in args.past:
        row = {}
        for name, build in builders.items():
            try:
                session = ort.InferenceSession(build().SerializeToString(), options, providers=["CPUExecutionProvider"])
                row[name] = median_ms(session, feeds(name, past, rng), args.repeats)
            except Exception as exc:  # a candidate ORT cannot run is reported, not fatal
                print(f"  {name} at past {past}: {type(exc).__name__}: {str(exc)[:120]}")
                row[name] = float("nan")
        base = row["folded"]
        print(f"{past:>6} " + " ".join(f"{row[n]:>8.3f} ms {row[n] / base:>4.2f}x" for n in builders))


if __name__ == "__main__":
    main()
