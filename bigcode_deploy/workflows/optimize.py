"""`bigcode-deploy optimize BUNDLE OUT --target ...`: a new bundle whose graph is lowered for one target.

Crosses layers (so it lives above them): a dtype other than the bundle's re-exports the recorded source checkpoint
(exporter; the per-layer softmax unscale makes an fp32 graph and an fp16 graph differ in more than their casts),
the passes are graphs', and the check is runtime's one verdict. The new manifest records the target, the passes
applied, how often each fired and why one fired 0 times. Before the bundle appears, the new graph is judged on ONNX
Runtime against the stored torch reference outputs it carries (the same prompts, run and criteria as `verify`), so a
rewrite that changes numerics cannot be written silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import onnx_ir as ir

from bigcode_deploy.graphs import quantize_weights
from bigcode_deploy.graphs.lint import lint_tensorrt
from bigcode_deploy.graphs.pipeline import run_passes
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError, LintError
from bigcode_deploy.runtime.hashing import sha256_files
from bigcode_deploy.runtime.manifest import (
    DATA_FILE,
    DOMAIN,
    GRAPH_FILE,
    GRAPH_OUTPUT_FILES,
    MAX_DIM,
    TARGETS,
    GraphFiles,
    PassRecord,
)
from bigcode_deploy.runtime.parity import ParityReport
from bigcode_deploy.runtime.progress import Progress, print_progress, step
from bigcode_deploy.runtime.staging import refuse_existing, staged_dir
from bigcode_deploy.runtime.verify import verify_bundle

DEFAULT_MAX_BATCH = 8


def _reexport(bundle: Bundle, dtype: str, workdir: Path, progress: Progress) -> Bundle:
    from bigcode_deploy.exporter.checkpoint import check_source
    from bigcode_deploy.exporter.export import export_bundle

    m = bundle.manifest
    model_dir = source_checkpoint(bundle)
    if not model_dir.is_dir():
        raise BigCodeError(
            f"--dtype {dtype} needs the source checkpoint {model_dir} (recorded in the manifest), which does not "
            f"exist; export it with --dtype {dtype} instead"
        )
    check_source(model_dir, m.source)  # CheckpointError naming the files whose sha256 changed
    out = export_bundle(
        model_dir,
        workdir / "reexport",
        task=m.task,
        dtype=dtype,
        opset=m.opset,
        use_cache=m.kv_cache is not None,
        external_data=m.graph.external_data is not None,
        check=dtype != "bf16",
        progress=progress,
    )
    return Bundle.open(out)


def source_checkpoint(bundle: Bundle) -> Path:
    """The checkpoint directory the manifest records (absolute in bundles exported since it is resolved)."""
    return Path(bundle.manifest.source.get("model_dir", ""))


def check_on_ort(bundle_dir: Path, target: str) -> ParityReport:
    """The new bundle on ONNX Runtime against its stored reference (what `verify` does); raises ParityError naming
    the first failure."""
    report = verify_bundle(bundle_dir, backend="ort", write=False)
    report.raise_on_failure(f"the {target} graph fails its check")
    return report


def optimize_bundle(
    bundle_path: str | Path,
    out_dir: str | Path,
    *,
    target: str,
    dtype: str | None = None,
    last_token_logits: bool = False,
    quantize: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    force: bool = False,
    check: bool = True,
    progress: Progress = print_progress,
) -> Path:
    """Write OUT_DIR: BUNDLE's graph rewritten for `target` (portable, ort, tensorrt), optionally in another dtype
    (re-exported from the recorded checkpoint), with last-token logits (always for tensorrt), or with int8/int4
    weight-only MatMuls (ort).

    Returns out_dir. Raises BigCodeError for a bad option combination, an existing out_dir without force (also one
    another command created while this one ran), an out_dir that is or contains BUNDLE (or, re-exporting, the
    source checkpoint), CheckpointError for a re-export whose checkpoint changed, LintError for a tensorrt graph
    TensorRT's parser would reject, ParityError when the new graph fails its check; in each case nothing is written
    under out_dir."""
    out_dir = Path(out_dir)
    if target not in TARGETS:
        raise BigCodeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_DIM:
        raise BigCodeError(f"--max-batch {str(max_batch)[:40]} must be an integer in [1, {MAX_DIM}] (rows of a batch)")
    if quantize is not None and target != "ort":
        raise BigCodeError(f"--quantize is for the ort target (MatMulNBits is an ONNX Runtime op), not {target}")
    refuse_existing(out_dir, force, inputs=[bundle_path])
    source = Bundle.open(bundle_path)
    if source.manifest.target != "portable" and source.manifest.passes:
        raise BigCodeError(
            f"{bundle_path} is already optimized for {source.manifest.target}; optimize the exported (portable) "
            "bundle instead"
        )
    dtype = dtype or source.manifest.dtype
    if target == "tensorrt" and dtype == "fp32":
        raise BigCodeError("the tensorrt target carries its precision in the graph's dtypes: pass --dtype fp16 or bf16")
    if target == "tensorrt":
        last_token_logits = True  # a prefill reads the last position only; build-engine's profiles follow the manifest
    if quantize is not None and dtype != "fp32":
        raise BigCodeError(f"--quantize {quantize} quantizes an fp32 bundle's weights; this one would be {dtype}")
    if check and dtype == "bf16":
        raise BigCodeError(
            "a bf16 graph cannot be checked here (ONNX Runtime's CPU provider has no bf16 kernels); "
            "pass --no-check to write it unchecked"
        )
    # Re-exporting reads the recorded checkpoint too: OUT_DIR must not be, or hold, either input.
    inputs = [bundle_path, source.manifest.source.get("model_dir") if dtype != source.manifest.dtype else None]
    # One staging directory holds the work (a re-export) and the new bundle: a failure, an interrupt, SIGTERM or
    # SIGHUP removes all of it, and a killed run's is recognised and removed by the next (runtime/staging.py).
    with staged_dir(out_dir, force, inputs=inputs) as staging:
        work = staging / ".work"
        work.mkdir()
        if dtype != source.manifest.dtype:
            with step(progress, f"re-exporting the source checkpoint as {dtype}"):
                source = _reexport(source, dtype, work, progress)
        with step(progress, f"loading {source.graph_path}"):
            model = ir.load(source.graph_path)
        with step(progress, f"running the {target} passes"):
            passes = run_passes(model, target, last_token_only=last_token_logits)
        quantization = None
        if quantize is not None:
            with step(progress, f"quantizing weights ({quantize}, MatMulNBits)"):
                model, count, reason = quantize_weights.apply(model, quantize)
            passes.append(PassRecord(f"quantize_weights.{quantize}", count, reason))
            quantization = {
                "scheme": quantize,
                "bits": quantize_weights.BITS[quantize],
                "block_size": quantize_weights.BLOCK_SIZE,
                "op": "com.microsoft::MatMulNBits",
                "symmetric": True,
                "accuracy_level": quantize_weights.ACCURACY_LEVEL,
                "exact": ["token and position embeddings (Gather)", "LayerNorm", "attention", "KV cache"],
            }
        for p in passes:
            progress(f"  {p.name}: fired {p.count}x" + (f" ({p.reason})" if p.reason else ""))
        custom_ops_used = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN})
        external = source.manifest.graph.external_data is not None
        ir.save(model, staging / GRAPH_FILE, external_data=DATA_FILE if external else None)
        del model
        graph = GraphFiles(GRAPH_FILE, DATA_FILE if external else None, {})
        graph.sha256 = sha256_files([staging / name for name in graph.names])
        manifest = source.manifest.derive(
            target=target,
            passes=passes,
            custom_ops_used=custom_ops_used,
            graph=graph,
            last_token_logits=last_token_logits,
            max_batch=max_batch if target == "tensorrt" else None,
            quantization=quantization,
            attention_scale="query" if target == "tensorrt" else None,  # run_passes refuses a graph it could not fold
        )
        if target == "tensorrt":
            problems = lint_tensorrt(onnx.load(str(staging / GRAPH_FILE), load_external_data=False), manifest)
            if problems:
                raise LintError("the tensorrt graph fails the lint:\n" + "\n".join(problems))
        for item in source.path.iterdir():  # tokenizer, Hugging Face config files, the reference outputs
            if item.is_file() and item.name not in GRAPH_OUTPUT_FILES:
                shutil.copy2(item, staging / item.name)
        shutil.rmtree(work)
        manifest.write(staging)
        if check:
            with step(progress, "checking on ONNX Runtime against the stored torch reference"):
                report = check_on_ort(staging, target)
            progress(report.summary())
    progress(f"wrote {out_dir}")
    return out_dir
