"""Export a checkpoint to a deployment bundle: manifest.json, model.onnx (+ external data), tokenizer files.

One graph serves prefill and decode (a past of length 0 is valid). The bundle appears atomically: everything is
written under a temporary name beside OUT_DIR and renamed at the end; a failure leaves nothing under OUT_DIR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim

from bigcode_deploy.exporter.checkpoint import default_model_dir, load_model, source_record
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.dtypes import dtype_name
from bigcode_deploy.exporter.hf_files import stop_token_ids, write_hf_files
from bigcode_deploy.exporter.onnx_functions import FUNCTIONS
from bigcode_deploy.runtime.bounded_file import read_bytes, read_json
from bigcode_deploy.runtime.errors import BigCodeError, CheckpointError
from bigcode_deploy.runtime.fim import DEFAULT_FIM_MODE, check_mode, fim_record
from bigcode_deploy.runtime.hashing import sha256_files
from bigcode_deploy.runtime.manifest import (
    BATCH,
    DATA_FILE,
    DOMAIN,
    DOMAIN_VERSION,
    GRAPH_FILE,
    MAX_TOKENIZER_BYTES,
    OPSETS,
    PAST,
    SEQUENCE,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    GraphFiles,
    Manifest,
    has_cache,
    io_spec,
)
from bigcode_deploy.runtime.progress import Progress, print_progress, step
from bigcode_deploy.runtime.staging import refuse_existing, staged_dir
from bigcode_deploy.runtime.text import read_tokenizer
from bigcode_deploy.runtime.version import __version__

# A protobuf holds at most 2 GiB: above this many weight bytes the graph always gets external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30


class ExportModule(nn.Module):
    """Flat graph I/O around a task model: (input_ids, attention_mask[, position_ids][, past list]) -> tuple."""

    def __init__(self, model: nn.Module, task: str, cache: bool):
        super().__init__()
        self.model = model
        self.task = task
        self.cache = cache

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None):
        if self.task in ("sequence-classification", "token-classification"):
            main, _ = self.model(input_ids, attention_mask)
            return (main,)
        main, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        return (main, *presents) if self.cache else (main,)


def example_inputs(config: GPTBigCodeConfig, task: str, cache: bool, dtype: torch.dtype) -> tuple:
    """Tracing inputs. Sizes >= 2 and pairwise different, so torch.export specialises no dim and merges none."""
    B, T, P = 2, 3, 4 if cache else 0
    input_ids = torch.randint(0, config.vocab_size, (B, T))
    attention_mask = torch.ones(B, P + T, dtype=torch.long)
    attention_mask[1, :2] = 0  # a left-padded row
    if task in ("sequence-classification", "token-classification"):
        return (input_ids, attention_mask)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    if not cache:
        return (input_ids, attention_mask, position_ids)
    past = [
        torch.randn(*([B, P] if config.multi_query else [B, config.n_head, P]), 2 * config.head_dim, dtype=dtype)
        for _ in range(config.n_layer)
    ]
    return (input_ids, attention_mask, position_ids, past)


def dynamic_shapes(config: GPTBigCodeConfig, task: str, cache: bool) -> tuple:
    batch, seq, past = Dim(BATCH), Dim(SEQUENCE, max=config.n_positions), Dim(PAST, max=config.n_positions)
    # The mask's length is past + sequence; torch.export derives that relation itself (Dim.AUTO).
    shapes = [{0: batch, 1: seq}, {0: batch, 1: Dim.AUTO if cache else seq}]
    if task in ("sequence-classification", "token-classification"):
        return tuple(shapes)
    shapes.append({0: batch, 1: seq})
    if cache:
        axis = 1 if config.multi_query else 2
        shapes.append([{0: batch, axis: past} for _ in range(config.n_layer)])
    return tuple(shapes)


def to_onnx_ir(
    model: nn.Module, config: GPTBigCodeConfig, task: str, cache: bool, opset: int, dtype: torch.dtype
) -> tuple[ir.Model, list[str]]:
    """torch.onnx (dynamo) export, then the bundle's conventions applied to the IR (no proto copy of weights).

    Returns the model and the bigcode ops it uses.
    """
    inputs, outputs = io_spec(config.to_dict(), task, dtype_name(dtype), cache)
    module = ExportModule(model, task, cache).eval()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(None), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example_inputs(config, task, cache, dtype),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(config, task, cache),
            input_names=[i.name for i in inputs],
            output_names=[o.name for o in outputs],
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    ir_model = program.model
    for value, spec in zip([*ir_model.graph.inputs, *ir_model.graph.outputs], [*inputs, *outputs]):
        if value.name != spec.name:
            raise RuntimeError(f"exported graph I/O {value.name!r} where {spec.name!r} was expected")
        value.shape = ir.Shape(spec.shape)  # the manifest's symbolic names (torch names the mask's length sNN)
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()  # torch's stack traces name this machine's paths; they are not part of the graph
    used = sorted({n.op_type for n in ir_model.graph.all_nodes() if n.domain == DOMAIN})
    for op in used:
        function = ir.serde.deserialize_function(FUNCTIONS[op]())
        ir_model.functions[function.identifier()] = function
    if used:
        ir_model.opset_imports[DOMAIN] = DOMAIN_VERSION
    ir_model.producer_name = "bigcode-deploy"
    ir_model.producer_version = __version__
    return ir_model, used


@contextlib.contextmanager
def _quiet_torch_onnx():
    """torch.onnx logs a warning per missing optional package (torchvision); keep the user's output to progress."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def checked_tokenizer_files(source_dir: Path) -> list[str]:
    """The checkpoint's tokenizer files (TOKENIZER_FILES) present, each a regular file of at most MAX_TOKENIZER_BYTES,
    the JSON ones valid JSON (tokenizer.json is read by read_tokenizer). Raises CheckpointError (one line) for one that
    is a dangling link, a directory, a device, too large or not JSON: a bundle ships them, so they are checked before
    any work."""
    present = []
    for name in TOKENIZER_FILES:
        path = source_dir / name
        if not os.path.lexists(path):
            continue
        if name != TOKENIZER_FILE:
            read = read_json if name.endswith(".json") else read_bytes
            read(path, limit=MAX_TOKENIZER_BYTES, error=CheckpointError, fix="re-save the checkpoint's tokenizer")
        present.append(name)
    return present


def export_bundle(
    model_dir: str | Path | None,
    out_dir: str | Path,
    *,
    task: str = "causal-lm",
    dtype: str = "fp32",
    opset: int = 18,
    use_cache: bool = True,
    external_data: bool = False,
    force: bool = False,
    check: bool = True,
    fim_mode: str = DEFAULT_FIM_MODE,
    progress: Progress = print_progress,
) -> Path:
    """Write a deployment bundle for the checkpoint in model_dir (None: the embedded default) to out_dir.

    The bundle: manifest.json (runtime/manifest.py), model.onnx (+ model.onnx.data with external_data, or above
    1 GiB of weights), the checkpoint's tokenizer files, config.json and generation_config.json (causal-lm), and
    the fp32 torch reference's teacher-forced outputs (reference_outputs.safetensors). One graph serves prefill and
    decode: inputs input_ids (batch, sequence) int64, attention_mask (batch, past_sequence + sequence) int64,
    position_ids (batch, sequence) int64, past_key_values.{layer}.key_value (MQA: batch, past_sequence, 2 * head_dim)
    in `dtype`; outputs logits (batch, sequence, vocab) and present.{layer}.key_value. With check, onnx.checker
    (full) and ONNX Runtime against the stored reference must pass before the bundle appears (atomically).

    Returns out_dir. Raises BigCodeError for an existing out_dir without force (also one another command created
    while this one ran), an out_dir that is or contains model_dir, an unsupported opset or an uncheckable dtype
    (bf16 with check); ConfigError/CheckpointError for a checkpoint that cannot be read; ParityError when ONNX
    Runtime disagrees with the reference. Nothing is left under out_dir on failure, nor beside it
    (bigcode_deploy.runtime.staging). manifest.json records the source checkpoint resolved, with its sha256 and its
    format (gpt_bigcode, or the original SantaCoder format, mapped on load), every field of its config.json, and
    (causal-lm) the default stop ids from generation_config.json."""
    from bigcode_deploy.exporter.check import check_bundle  # the check runs ONNX Runtime; imported only when exporting
    from bigcode_deploy.exporter.reference_capture import capture_reference

    out_dir = Path(out_dir)
    source_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    check_mode(fim_mode)  # psm or spm: the FIM prompt order recorded for the bundle (runtime/fim.py)
    if opset not in OPSETS:
        raise BigCodeError(f"--opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
    refuse_existing(out_dir, force, inputs=[source_dir])  # never the checkpoint itself, nor a folder holding it
    if check and dtype == "bf16":
        raise BigCodeError(
            "dtype bf16 cannot be checked on this device: ONNX Runtime's CPU provider has no bf16 kernels "
            "(it fails on the first Add); pass --no-check to export it unchecked, or export fp16/fp32"
        )

    with step(progress, f"loading {source_dir} ({task}, {dtype})"):
        model, config = load_model(source_dir, task=task, dtype=dtype)
    stops = stop_token_ids(source_dir, config) if task == "causal-lm" else None  # before any work: a bad file fails
    tokenizer_files = checked_tokenizer_files(source_dir)  # shipped in the bundle: checked before any work
    fim = None
    if TOKENIZER_FILE in tokenizer_files:
        tokenizer_object = read_tokenizer(source_dir / TOKENIZER_FILE, CheckpointError, "re-save its tokenizer")
        fim = fim_record(tokenizer_object, fim_mode) if task == "causal-lm" else None
    cache = has_cache(task, use_cache)
    torch_dtype = next(model.parameters()).dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = external_data or weight_bytes > EXTERNAL_DATA_THRESHOLD

    with staged_dir(out_dir, force, inputs=[source_dir]) as staging:
        with step(progress, f"exporting to ONNX (opset {opset}, {weight_bytes / 1e6:.1f} MB of weights)"):
            ir_model, custom_ops_used = to_onnx_ir(model, config, task, cache, opset, torch_dtype)
        with step(progress, "writing " + (f"{GRAPH_FILE} + {DATA_FILE}" if external else GRAPH_FILE)):
            ir.save(ir_model, staging / GRAPH_FILE, external_data=DATA_FILE if external else None)
            del ir_model
            graph_files = [staging / GRAPH_FILE] + ([staging / DATA_FILE] if external else [])
            graph_hashes = sha256_files(graph_files)
        for name in tokenizer_files:
            shutil.copy2(source_dir / name, staging / name)
        tokenizer = TOKENIZER_FILE if TOKENIZER_FILE in tokenizer_files else None
        hf_files = write_hf_files(source_dir, staging, config, task, cache=cache)
        with step(progress, "hashing the source checkpoint"):
            source = source_record(source_dir)  # resolved: commands run from any directory find it
            source["format"] = config.source_format  # gpt_bigcode, or santacoder-gpt2-mq (mapped on load)
        manifest = Manifest.build(
            config.to_dict(),
            task=task,
            dtype=dtype,
            opset=opset,
            use_cache=use_cache,
            package_version=__version__,
            graph=GraphFiles(GRAPH_FILE, DATA_FILE if external else None, graph_hashes),
            source=source,
            tokenizer=tokenizer,
            custom_ops_used=custom_ops_used,
            hf_files=hf_files,
            stop_token_ids=stops,
            fim=fim,
        )
        with step(progress, "capturing the torch reference outputs (fp32, teacher-forced)"):
            manifest.reference = capture_reference(source_dir, manifest, staging, model=model)
        manifest.write(staging)
        if check:
            with step(progress, "checking: onnx.checker (full) and ONNX Runtime against the torch reference"):
                report = check_bundle(staging)
            progress(report.summary())
    progress(f"wrote {out_dir}")
    return out_dir
