"""Capture the torch reference's teacher-forced outputs for a bundle: stored in it at export, or computed live by
`verify --model DIR`. The recipe, the run and the file format are runtime's (bigcode_deploy.runtime.reference);
this module only supplies the torch side.

The reference is always the fp32 model. For a bundle in fp16 or bf16, the torch model in that dtype is run on the
same tokens too, and its error to the fp32 reference is recorded: reduced-precision graphs are judged relative to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from bigcode_deploy.exporter.checkpoint import load_model
from bigcode_deploy.exporter.torch_backend import TorchBackend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import ParityError
from bigcode_deploy.runtime.generate import GenerationOptions, generate
from bigcode_deploy.runtime.manifest import REFERENCE_FILE, Manifest, ReferenceRecord
from bigcode_deploy.runtime.reference import (
    GREEDY_TOKENS,
    STEPS,
    ReferenceOutputs,
    reference_prompts,
    steps_that_fit,
    teacher_forced,
)
from bigcode_deploy.runtime.session import DecodingSession


def reference_outputs(
    model_dir: str | Path,
    manifest: Manifest,
    *,
    model: nn.Module | None = None,
    steps: int = STEPS,
    greedy_tokens: int = GREEDY_TOKENS,
    seed: int = 0,
    kind: str = "stored",
    threads: int = 0,
) -> ReferenceOutputs:
    """The fp32 torch reference for the bundle described by `manifest` (and the manifest dtype's error terms).

    model: an already-loaded reference model in the manifest's dtype (export passes the one it exported).
    Raises CheckpointError/ConfigError for a checkpoint that cannot be loaded."""
    config = manifest.config
    prompts = reference_prompts(config["vocab_size"], config["n_positions"], seed)
    steps = steps_that_fit(prompts, config["n_positions"], steps)
    greedy_tokens = steps_that_fit(prompts, config["n_positions"], greedy_tokens)
    shell = Bundle(Path(model_dir), manifest)  # names and shapes only: nothing is opened
    reduced = manifest.dtype != "fp32"
    fp32_model = model if not reduced and model is not None else None
    if fp32_model is None:
        fp32_model, _ = load_model(model_dir, task=manifest.task, dtype="fp32")
    with TorchBackend(shell, model=fp32_model, threads=threads) as torch32:
        run32 = teacher_forced(torch32.run, manifest, prompts, None, steps)
        greedy: list[list[int]] = []
        if manifest.task == "causal-lm" and manifest.kv_cache is not None and greedy_tokens > 0:
            options = GenerationOptions(max_new_tokens=greedy_tokens, stop_token_ids=())
            try:
                greedy = generate(DecodingSession(torch32, shell), prompts, options)
            except ParityError:
                raise ParityError(
                    f"the torch reference of {model_dir} produced non-finite logits; check the checkpoint "
                    "(a broken weight?)"
                ) from None
    del fp32_model
    reference = ReferenceOutputs(run=run32, greedy=greedy, model_dtype=manifest.dtype, kind=kind)
    if reduced:
        reduced_model = (
            model if model is not None else load_model(model_dir, task=manifest.task, dtype=manifest.dtype)[0]
        )
        with TorchBackend(shell, model=reduced_model, threads=threads) as torch_reduced:
            run_reduced = teacher_forced(torch_reduced.run, manifest, prompts, run32.tokens, steps)
        main_error, stats_error = [], []
        for ref, red in zip(run32.steps, run_reduced.steps):
            diff = np.abs(red.main.astype(np.float64) - ref.main.astype(np.float64))
            main_error.append([diff.max() if diff.size else 0.0, diff.mean() if diff.size else 0.0])
            if ref.present_stats is not None:
                stats_error.append(np.abs(red.present_stats - ref.present_stats))
        reference.main_error = np.asarray(main_error, dtype=np.float64)
        reference.stats_error = np.asarray(stats_error, dtype=np.float64) if stats_error else None
    reference.check(manifest, f"the torch reference of {model_dir}", ParityError)
    return reference


def capture_reference(
    model_dir: str | Path, manifest: Manifest, bundle_dir: Path, *, model: nn.Module
) -> ReferenceRecord:
    """Compute the reference outputs and store them in bundle_dir (REFERENCE_FILE); returns the manifest record."""
    return reference_outputs(model_dir, manifest, model=model).save(bundle_dir, REFERENCE_FILE)
