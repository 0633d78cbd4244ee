"""The export-time check: onnx.checker (full, with shape inference) and ONNX Runtime against the torch model.

Runs a left-padded batch of three prompts of different lengths through a prefill (past length 0) and two cached
decode steps, feeding the graph from the manifest, and compares every output with the torch model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from exporter.errors import BigCodeError
from runtime.bundle import Bundle, position_ids
from runtime.parity import TOLERANCES, ParityError, ParityReport, compare

DECODE_STEPS = 2


def left_padded_prompts(vocab_size: int, lengths=(5, 3, 1), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), dtype=np.int64)
    mask = np.zeros((len(lengths), T), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, T - n:] = rng.integers(0, vocab_size, n)
        mask[row, T - n:] = 1
    return ids, mask


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_step(model: nn.Module, task: str, feeds: dict[str, np.ndarray], past_names: list[str]) -> list[np.ndarray]:
    args = [torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])]
    with torch.no_grad():
        if task in ("sequence-classification", "token-classification"):
            main, presents = model(*args)
            return [main.float().numpy()]
        past = [torch.from_numpy(feeds[n]).to(next(model.parameters()).dtype) for n in past_names] or None
        if past is not None and past[0].shape[-2] == 0:
            past = None  # the reference takes "no past" for the graph's empty past
        main, presents = model(*args, torch.from_numpy(feeds["position_ids"]), past)
    outs = [main.float().numpy()]
    if past_names:
        outs += [p.float().numpy() for p in presents]
    return outs


def check_bundle(bundle_dir: Path, model: nn.Module, steps: int = DECODE_STEPS) -> ParityReport:
    bundle = Bundle.open(bundle_dir)
    graph = bundle.graph_path
    try:
        onnx.checker.check_model(str(graph), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BigCodeError(f"onnx.checker rejected the exported graph: {exc}") from None
    manifest = bundle.manifest
    dtype, task = manifest["dtype"], manifest["task"]
    if dtype == "bf16":
        raise BigCodeError("bf16 graphs cannot be checked here: ONNX Runtime's CPU provider has no bf16 kernels")
    atol, rtol = TOLERANCES[dtype]
    session = ort_session(graph)
    ids, mask = left_padded_prompts(bundle.config["vocab_size"])
    past_names = bundle.past_names()
    feeds = {"input_ids": ids, "attention_mask": mask, **bundle.empty_past(ids.shape[0])}
    report = ParityReport(dtype=dtype, atol=atol, rtol=rtol)
    for step in range(steps + 1 if past_names else 1):
        past_length = feeds[past_names[0]].shape[-2] if past_names else 0
        if "position_ids" in bundle.input_names:
            feeds["position_ids"] = position_ids(feeds["attention_mask"], past_length)
        actual = session.run(bundle.output_names, feeds)
        expected = _torch_step(model, task, feeds, past_names)
        report.steps.append([
            compare(name, a.astype(np.float32), e, atol, rtol)
            for name, a, e in zip(bundle.output_names, actual, expected)
        ])
        if not past_names:
            break
        next_ids = expected[0][:, -1].argmax(-1)[:, None].astype(np.int64)  # greedy from the reference
        feeds = {
            "input_ids": next_ids,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones_like(next_ids)], axis=1),
            **{p: a for p, a in zip(past_names, actual[1:])},
        }
    failure = report.first_failure()
    if failure:
        step, c = failure
        raise ParityError(
            f"ONNX Runtime disagrees with torch at step {step} on {c.name}: max abs diff {c.max_abs:.3g}, "
            f"{c.mismatches}/{c.size} values beyond abs {atol:g} and rel {rtol:g}"
        )
    return report
