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
from runtime.bundle import Bundle, position_ids, sha256_file
from runtime.parity import QUANTIZED_CRITERIA, TOLERANCES, ParityError, compare

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
    """Run both graphs on ORT over a left-padded batch (prefill + cached steps). Returns a one-line summary.

    Elementwise within the dtype's tolerance; a quantized graph instead by QUANTIZED_CRITERIA (top-1 agreement
    and mean abs logit error against the input bundle).
    """
    atol, rtol = TOLERANCES[new.manifest["dtype"]]
    quantization = new.manifest.get("quantization")
    criteria = QUANTIZED_CRITERIA[quantization["scheme"]] if quantization else None
    vocab = new.config["vocab_size"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, **old.empty_past(3)}
    feeds_new = dict(feeds)
    worst, agree, total, abs_sum, abs_n = 0.0, 0, 0, 0.0, 0
    past_names, present_names = old.past_names(), old.present_names()
    with OrtBackend(new) as run_new, OrtBackend(old) as run_old:
        for s in range(steps + 1 if past_names else 1):
            if "position_ids" in old.input_names:
                past = feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1]
                feeds["position_ids"] = feeds_new["position_ids"] = position_ids(feeds["attention_mask"], past)
            out_old, out_new = run_old.run(feeds), run_new.run(feeds_new)
            for name in old.output_names:
                expected, actual = out_old[name], out_new[name]
                if name == "logits" and actual.ndim == 3 and actual.shape[1] == 1 != expected.shape[1]:
                    expected = expected[:, -1:]  # last-token logits
                actual, expected = actual.astype(np.float32), expected.astype(np.float32)
                c = compare(name, actual, expected, atol, rtol)
                worst = max(worst, c.max_abs)
                if criteria is not None:
                    if name == "logits":
                        agree += int((actual.argmax(-1) == expected.argmax(-1)).sum())
                        total += actual.shape[0] * actual.shape[1]
                        abs_sum += float(np.abs(actual - expected).sum())
                        abs_n += actual.size
                elif not c.ok:
                    raise ParityError(
                        f"the optimized graph disagrees with the input bundle at step {s} on {name}: max abs diff "
                        f"{c.max_abs:.3g} beyond abs {atol:g} and rel {rtol:g}"
                    )
            if not past_names:
                break
            next_ids = out_old["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            grown = np.concatenate([feeds["attention_mask"], np.ones_like(next_ids)], axis=1)
            feeds = {"input_ids": next_ids, "attention_mask": grown,
                     **{p: out_old[q] for p, q in zip(past_names, present_names)}}
            feeds_new = {"input_ids": next_ids, "attention_mask": grown,
                         **{p: out_new[q] for p, q in zip(past_names, present_names)}}
    if criteria is None:
        return f"parity ok against the input bundle: worst max abs diff {worst:.3g}"
    top1, mean_abs = agree / total, abs_sum / abs_n
    summary = (f"top-1 agreement {top1:.3f} (needs >= {criteria['min_top1']}), mean abs logit error {mean_abs:.4f} "
               f"(needs <= {criteria['max_mean_abs']})")
    if top1 < criteria["min_top1"] or mean_abs > criteria["max_mean_abs"]:
        raise ParityError(f"the {quantization['scheme']} graph is too far from the input bundle: {summary}")
    return f"quantized parity ok against the input bundle: {summary}"


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
