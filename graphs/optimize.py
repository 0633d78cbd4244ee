"""`bigcode-deploy optimize BUNDLE OUT --target ...`: a new bundle whose graph is lowered for one target.

The new manifest records the target, the passes applied and how often each fired. Before the bundle appears,
the new graph is compared with the input bundle's on ONNX Runtime over a prefill and cached decode steps (same
dtype tolerances as verify), so a rewrite that changes numerics cannot be written silently. A dtype other than
the bundle's is produced by re-exporting the recorded source checkpoint (the per-layer softmax unscale makes
an fp32 graph and an fp16 graph differ in more than their casts).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from exporter.errors import BigCodeError
from exporter.progress import Progress, print_progress, step
from exporter.staging import refuse_existing, staged_dir
from graphs import quantize_weights
from graphs.lint import lint_tensorrt
from graphs.pipeline import run_passes
from runtime.backends import OrtBackend
from runtime.bundle import Bundle, sha256_file
from runtime.parity import QUANTIZED_CRITERIA, TOLERANCES, ParityError
from runtime.verify import VerifyReport, teacher_forced

GRAPH_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
NOT_COPIED = {GRAPH_FILE, DATA_FILE, "manifest.json", "parity.json"}
DEFAULT_MAX_BATCH = 8


class LintError(BigCodeError):
    """A graph that TensorRT's parser would reject."""


def _reexport(bundle: Bundle, dtype: str, workdir: Path, progress: Progress) -> Bundle:
    from exporter.checkpoint import sha256_files, weight_files
    from exporter.export import export_bundle

    source = bundle.manifest["source"]
    model_dir = Path(source["model_dir"])
    if not model_dir.is_dir():
        raise BigCodeError(
            f"--dtype {dtype} needs the source checkpoint {model_dir} (recorded in the manifest), which does not exist; "
            f"export it with --dtype {dtype} instead"
        )
    if sha256_files([model_dir / "config.json", *weight_files(model_dir)]) != source["sha256"]:
        raise BigCodeError(f"{model_dir} changed since the bundle was exported (sha256 differs); re-export the bundle")
    m = bundle.manifest
    out = export_bundle(
        model_dir, workdir / "reexport", task=m["task"], dtype=dtype, opset=m["opset"],
        use_cache=m["kv_cache"] is not None, external_data=m["graph"]["external_data"] is not None,
        check=dtype != "bf16", progress=progress,
    )
    return Bundle.open(out)


def compare_bundles(new: Bundle, old: Bundle, steps: int = 2) -> str:
    """Both graphs on ORT, teacher-forced over a left-padded batch (prefill + cached steps). Returns a summary.

    Elementwise within the dtype's tolerance; a quantized graph instead by QUANTIZED_CRITERIA (top-1 agreement
    and mean abs logit error against the input bundle).
    """
    atol, rtol = TOLERANCES[new.manifest["dtype"]]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, new.config["vocab_size"], n).tolist() for n in (6, 3, 1)]
    with OrtBackend(old) as reference, OrtBackend(new) as candidate:
        report = VerifyReport(backend="ort", dtype=new.manifest["dtype"], atol=atol, rtol=rtol,
                              prompt_lengths=[len(p) for p in prompts],
                              steps=teacher_forced(reference, candidate, old, prompts, steps, atol, rtol))
    quantization = new.manifest.get("quantization")
    if quantization:
        report.quantized = QUANTIZED_CRITERIA[quantization["scheme"]]
        summary = (f"top-1 agreement {report.top1_agreement:.3f} (needs >= {report.quantized['min_top1']}), mean abs "
                   f"logit error {report.mean_abs_logit_error:.4f} (needs <= {report.quantized['max_mean_abs']})")
        if not report.ok:
            raise ParityError(f"the {quantization['scheme']} graph is too far from the input bundle: {summary}")
        return f"quantized parity ok against the input bundle: {summary}"
    for s in report.steps:
        for c in (s.logits, s.presents):
            if c is not None and not c.ok:
                raise ParityError(
                    f"the optimized graph disagrees with the input bundle at step {s.step} on {c.name}: max abs diff "
                    f"{c.max_abs:.3g} beyond abs {atol:g} and rel {rtol:g}"
                )
    worst = max(max(s.logits.max_abs, s.presents.max_abs if s.presents else 0.0) for s in report.steps)
    return f"parity ok against the input bundle: worst max abs diff {worst:.3g}"


def optimize_bundle(
    bundle_path: str | Path, out_dir: str | Path, *, target: str, dtype: str | None = None,
    last_token_logits: bool = False, quantize: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
    force: bool = False, check: bool = True, progress: Progress = print_progress,
) -> Path:
    out_dir = Path(out_dir)
    if quantize is not None and target != "ort":
        raise BigCodeError(f"--quantize is for the ort target (MatMulNBits is an ONNX Runtime op), not {target}")
    refuse_existing(out_dir, force)
    source = Bundle.open(bundle_path)
    if source.manifest["target"] != "portable" and source.manifest["passes"]:
        raise BigCodeError(f"{bundle_path} is already optimized for {source.manifest['target']}; optimize the exported "
                           "(portable) bundle instead")
    dtype = dtype or source.manifest["dtype"]
    if target == "tensorrt" and dtype == "fp32":
        raise BigCodeError("the tensorrt target carries its precision in the graph's dtypes: pass --dtype fp16 or bf16")
    if check and dtype == "bf16":
        raise BigCodeError("a bf16 graph cannot be checked here (ONNX Runtime's CPU provider has no bf16 kernels); "
                           "pass --no-check to write it unchecked")
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.is_dir() else None) as work:
        if dtype != source.manifest["dtype"]:
            with step(progress, f"re-exporting the source checkpoint as {dtype}"):
                source = _reexport(source, dtype, Path(work), progress)
        with step(progress, f"loading {source.graph_path}"):
            model = ir.load(source.graph_path)
        with step(progress, f"running the {target} passes"):
            passes = run_passes(model, target, last_token_only=last_token_logits)
        if quantize is not None:
            if source.manifest["dtype"] != "fp32":
                raise BigCodeError(f"--quantize {quantize} quantizes an fp32 bundle's weights; this one is "
                                   f"{source.manifest['dtype']}")
            with step(progress, f"quantizing weights ({quantize}, MatMulNBits)"):
                model, count = quantize_weights.apply(model, quantize)
            passes.append({"name": f"quantize_weights.{quantize}", "count": count})
        for p in passes:
            progress(f"  {p['name']}: fired {p['count']}x")
        manifest = json.loads(json.dumps(source.manifest))
        manifest["target"] = target
        manifest["passes"] = passes
        manifest["custom_ops"]["used"] = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == "bigcode"})
        if last_token_logits:
            logits = next(o for o in manifest["outputs"] if o["name"] == "logits")
            logits["shape"][1] = 1
            manifest["logits_positions"] = "last"
        if target == "tensorrt":
            manifest["dims"]["batch"]["max"] = max_batch
        if quantize is not None:
            manifest["quantization"] = {
                "scheme": quantize, "bits": quantize_weights.BITS[quantize], "block_size": quantize_weights.BLOCK_SIZE,
                "op": "com.microsoft::MatMulNBits", "symmetric": True, "accuracy_level": quantize_weights.ACCURACY_LEVEL,
                "exact": ["token and position embeddings (Gather)", "LayerNorm", "attention", "KV cache"],
            }
        with staged_dir(out_dir, force) as staging:
            external = source.manifest["graph"]["external_data"] is not None
            ir.save(model, staging / GRAPH_FILE, external_data=DATA_FILE if external else None)
            del model
            if target == "tensorrt":
                problems = lint_tensorrt(onnx.load(str(staging / GRAPH_FILE), load_external_data=False), manifest)
                if problems:
                    raise LintError("the tensorrt graph fails the lint:\n" + "\n".join(problems))
            files = [GRAPH_FILE] + ([DATA_FILE] if external else [])
            manifest["graph"]["sha256"] = {name: sha256_file(staging / name) for name in files}
            for item in source.path.iterdir():
                if item.is_file() and item.name not in NOT_COPIED:
                    shutil.copy2(item, staging / item.name)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if check:
                with step(progress, "comparing with the input bundle on ONNX Runtime"):
                    summary = compare_bundles(Bundle.open(staging), source)
                progress(summary)
    progress(f"wrote {out_dir}")
    return out_dir


def lint_bundle(bundle_path: str | Path, target: str = "tensorrt") -> list[str]:
    if target != "tensorrt":
        raise BigCodeError(f"lint knows the tensorrt target only (got {target!r})")
    bundle = Bundle.open(bundle_path)
    return lint_tensorrt(onnx.load(str(bundle.graph_path), load_external_data=False), bundle.manifest)
