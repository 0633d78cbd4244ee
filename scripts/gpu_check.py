"""GPU check: the reference model on CUDA against the CPU, the ORT bundle on CUDA, and TensorRT where installed.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU. Prints a parity table and decode latencies; each part
that cannot run (no onnxruntime-gpu, no cuda-python, no tensorrt, a stub tensorrt wheel, no device visible to
cuda-python) prints one line "not checked: <reason>". Where TensorRT runs, the engine is built with detailed
profiling verbosity and its layers are printed (the engine inspector), so the fused attention kernels can be seen.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigcode_deploy.exporter.checkpoint import load_model, save_checkpoint
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.model import GPTBigCodeForCausalLM, init_weights
from bigcode_deploy.runtime.parity import REDUCED_PRECISION_FACTOR, TOLERANCES, ULP_AT_ONE


def write_checkpoint(path: Path, **config) -> Path:
    cfg = GPTBigCodeConfig(**config)
    return save_checkpoint(init_weights(GPTBigCodeForCausalLM(cfg), cfg, seed=0), cfg, path)


def decode(model, device, ids, mask, steps, tokens=None):
    model = model.to(device)
    ids, mask = ids.to(device), mask.to(device)
    outs, past, chosen = [], None, []
    with torch.no_grad():
        for step in range(steps + 1):
            logits, past = model(ids, mask, None, past)
            outs.append(logits.float().cpu())
            ids = tokens[step].to(device) if tokens else logits[:, -1].float().argmax(-1, keepdim=True)
            chosen.append(ids.cpu())
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
    return outs, chosen


def reference_on_cuda(model_dir: Path, label: str) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    cpu, config = load_model(model_dir, dtype="fp32")
    lengths = (9, 5, 2)
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, T - n :] = torch.randint(0, config.vocab_size, (n,), generator=g)
        mask[r, T - n :] = 1
    expected, tokens = decode(cpu, "cpu", ids, mask, 3)
    for dtype in ("fp32", "fp16", "bf16"):
        model, _ = load_model(model_dir, dtype=dtype)
        actual, _ = decode(model, "cuda", ids, mask, 3, tokens)
        errors = [np.abs(a.numpy() - e.numpy()) for a, e in zip(actual, expected)]
        worst = max(float(d.max()) for d in errors)
        top1 = np.mean(
            [(a[:, -1].argmax(-1) == e[:, -1].argmax(-1)).float().mean().item() for a, e in zip(actual, expected)]
        )
        if dtype == "fp32":  # the product's fp32 criterion: elementwise, abs or rel
            atol, rtol = TOLERANCES["fp32"]
            good = all(((d <= atol) | (d <= rtol * np.abs(e.numpy()))).all() for d, e in zip(errors, expected))
        else:  # the product's reduced-precision criterion: within a factor of the CPU torch model's own error
            cpu_reduced, _ = load_model(model_dir, dtype=dtype)
            own, _ = decode(cpu_reduced, "cpu", ids, mask, 3, tokens)
            good = all(
                float(d.max())
                <= REDUCED_PRECISION_FACTOR * float(np.abs(o.numpy() - e.numpy()).max())
                + ULP_AT_ONE[dtype] / 2 * float(np.abs(e.numpy()).max())
                for d, o, e in zip(errors, own, expected)
            )
        verdict = "ok" if good and top1 >= (1.0 if dtype == "fp32" else 2 / 3) else "FAIL"
        ok &= verdict == "ok"
        print(f"{label:<26}{'torch cuda ' + dtype:<18}{'stored fp32 ref':<16}{worst:>10.2e}{top1:>7.2f}  {verdict}")
    return ok


def decode_latency(model_dir: Path, device: str, dtype: str, prompt: int = 64, new: int = 64) -> float:
    model, config = load_model(model_dir, dtype=dtype)
    model = model.to(device)
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=device)
    mask = torch.ones(1, prompt, dtype=torch.long, device=device)
    with torch.no_grad():
        logits, past = model(ids, mask)
        times = []
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits, past = model(nxt, mask, None, past)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return float(np.median(times[4:]) * 1000)


def cuda_python_copies() -> bool:
    """runtime/cuda.py on the device (what the TensorRT backend moves its buffers with): uploads, the KV-cache row
    gather, the last-position logits download. Prints one line; True when it passes or cannot run here."""
    from bigcode_deploy.runtime import cuda
    from bigcode_deploy.runtime.errors import BackendUnavailable

    try:
        cuda.cudart()
        if cuda.device_count() == 0:
            print("cuda-python: not checked: no device visible to cuda-python (a driver / cuda-python major mismatch?)")
            return True
        name, capability = cuda.device_info()
    except (BackendUnavailable, cuda.CudaError) as exc:
        print(f"cuda-python: not checked: {exc}")
        return True
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((4, 7, 16)).astype(np.float16)
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32)
    with cuda.Stream() as stream:
        device = cuda.to_device(cache, stream)
        gathered = cuda.to_host(cuda.gather_rows(device, [3, 0, 1], stream), stream)
        last = cuda.last_position_to_host(cuda.to_device(logits, stream), stream)
        roundtrip = cuda.to_host(device, stream)
    good = (
        np.array_equal(gathered, cache[[3, 0, 1]])
        and np.array_equal(last, logits[:, -1])
        and np.array_equal(roundtrip, cache)
        and device.ptr % cuda.ALIGNMENT == 0
    )
    print(f"cuda-python copies on {name} (sm{capability[0]}{capability[1]}): " + ("ok" if good else "FAIL"))
    return good


def tensorrt_check(bundle: Path, out: Path) -> bool:
    """Lower the bundle, build its engine (detailed profiling verbosity), print the engine's layers and the TensorRT
    parity table. Prints "TensorRT: not checked: <reason>" and returns True where TensorRT cannot run here (not
    installed, a stub wheel whose import fails, no device visible to cuda-python); False when it runs and fails."""
    from bigcode_deploy.runtime.errors import BigCodeError
    from bigcode_deploy.runtime.tensorrt_engine import require_tensorrt

    try:
        trt = require_tensorrt()
    except Exception as exc:  # noqa: BLE001 - a stub or broken wheel can fail in any way on import: report, go on
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"TensorRT: not checked: {reason}")
        return True
    from bigcode_deploy.runtime.verify import verify_bundle
    from bigcode_deploy.workflows.build_engine import build_engine_for

    print(f"TensorRT {trt.__version__}: lowering the bundle and building its engine")
    try:
        # Lowering happens only on request: the engine is built in the new bundle named here.
        plan = build_engine_for(
            bundle, lower_to=out, max_batch=4, max_prompt=32, max_context=128, detailed_profile=True
        )
        print_engine_layers(trt, plan)
        report = verify_bundle(out, backend="tensorrt")
    except BigCodeError as exc:
        print(f"TensorRT: FAIL: {exc}")
        return False
    except Exception as exc:  # noqa: BLE001 - the binding raises RuntimeError in places: report it, go on
        print(f"TensorRT: FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc).strip() else ''}")
        return False
    print(report.table())
    return report.ok


def print_engine_layers(trt, plan: Path) -> None:
    """Each layer of the plan as the engine inspector describes it (name, type and tactic with DETAILED verbosity):
    a fused attention shows as one layer (an mha/fmha kernel or a Myelin region) instead of MatMul, Softmax,
    MatMul. Prints one line when the inspector is not available."""
    from bigcode_deploy.runtime.tensorrt_engine import trt_logger

    engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(plan.read_bytes())
    if engine is None or not hasattr(engine, "create_engine_inspector"):
        print("engine layers: not shown (the plan did not deserialize, or this TensorRT has no engine inspector)")
        return
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        layers = json.loads(text)["Layers"]
    except (ValueError, KeyError, TypeError):
        print(f"engine layers (raw inspector output):\n{text}")
        return
    print(f"engine layers ({len(layers)}):")
    for layer in layers:
        if isinstance(layer, dict):
            fields = (layer.get("Name", "?"), layer.get("LayerType", ""), layer.get("TacticName", ""))
            print("  " + "  ".join(str(f) for f in fields if f))
        else:
            print(f"  {layer}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu check: no CUDA device visible to torch; nothing to check")
        return 1
    print(
        f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
        f"torch {torch.__version__}"
    )
    work = Path(tempfile.mkdtemp())
    models = {
        "default model": Path("exporter/default_model"),
        "random 4-layer (std 0.2)": write_checkpoint(
            work / "random",
            vocab_size=512,
            n_positions=128,
            n_embd=128,
            n_layer=4,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=0,  # the defaults (50256) are outside this vocabulary: config validation refuses them
            eos_token_id=0,
        ),
    }
    print(f"{'model':<26}{'candidate':<18}{'reference':<16}{'max abs':>10}{'top-1':>7}  result")
    ok = all([reference_on_cuda(path, label) for label, path in models.items()])

    from bigcode_deploy.exporter.export import export_bundle
    from bigcode_deploy.runtime.progress import quiet
    from bigcode_deploy.runtime.verify import verify_bundle

    bundle = export_bundle(models["random 4-layer (std 0.2)"], work / "bundle", progress=quiet)
    report = verify_bundle(bundle)
    print(
        f"{'random 4-layer (std 0.2)':<26}{'ort cpu fp32':<18}{'stored fp32 ref':<16}"
        f"{max(s.outputs[0].max_abs for s in report.steps):>10.2e}{min(s.top1 for s in report.steps):>7.2f}  "
        + ("ok" if report.ok else "FAIL")
    )
    ok &= report.ok
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        report = verify_bundle(bundle, backend="ort-cuda")
        print(
            f"{'random 4-layer (std 0.2)':<26}{'ort cuda fp32':<18}{'stored fp32 ref':<16}"
            f"{max(s.outputs[0].max_abs for s in report.steps):>10.2e}{min(s.top1 for s in report.steps):>7.2f}  "
            + ("ok" if report.ok else "FAIL")
        )
        ok &= report.ok
    else:
        print(
            f"ONNX Runtime CUDA: not checked: onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
            "(install onnxruntime-gpu)"
        )
    ok &= cuda_python_copies()
    ok &= tensorrt_check(bundle, work / "trt")

    path = models["random 4-layer (std 0.2)"]
    print("decode latency, batch 1, 64-token prompt, median ms per token (random 4-layer model):")
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16"), ("cuda", "bf16")):
        print(f"  torch {device} {dtype}: {decode_latency(path, device, dtype):.3f} ms")
    print("gpu check: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
