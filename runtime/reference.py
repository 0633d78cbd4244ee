"""Teacher-forced outputs of one side (a backend, or the torch reference) and the bundle's stored reference file.

One prompt recipe (`reference_prompts`): a left-padded batch of three prompts of different lengths. One run
(`teacher_forced`): the prompts, then cached decode steps whose tokens are given (or, for the reference, chosen
greedily); it only runs and records, judging is runtime/parity.py's. What is recorded per step:
- the main output (logits or last_hidden_state) at every real (non-pad) position, rows in (batch, position) order,
  and the index of each batch row's last position among those rows;
- per layer, statistics of the present's key half and value half over every real position of the cache (past and
  new): mean, mean |x|, root mean square, max |x| -> (layers, 2, 4). Statistics, not the presents themselves, keep
  the stored file small (the bound below) while a wrong layer still shows.

The stored file (REFERENCE_FILE, safetensors: readable without torch, from C++ or Rust too) holds the fp32 torch
reference and, for a bundle in fp16/bf16, the error of the torch model in that dtype to it (what reduced-precision
criteria scale from). Size bound: 4 bytes x (real positions x width of the main output + steps x layers x 8) plus
the same again for the error terms' statistics; with the recipe's at most 12 + 6 + 1 prompt tokens and 4 steps
(31 positions) that is under 31 x vocab x 4 bytes: 6.1 MB at StarCoder's 49,152 tokens, 0.5 MB for the
default model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from bigcode_deploy.runtime.bundle import Bundle, left_pad, position_ids
from bigcode_deploy.runtime.errors import BundleError
from bigcode_deploy.runtime.hashing import sha256_file
from bigcode_deploy.runtime.manifest import Manifest, ReferenceRecord

STEPS = 4  # cached decode steps after the prefill
GREEDY_TOKENS = 8  # the reference's free-running greedy continuation, stored for the report
STATS = ("mean", "mean_abs", "rms", "max_abs")
MAX_ERROR_SHARE = 0.25  # a reduced-precision model's error to fp32, at most this share of the largest |output|

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # named arrays in, named arrays out


def reference_prompts(vocab_size: int, n_positions: int, seed: int = 0) -> list[list[int]]:
    """The one prompt recipe: three random-id prompts of lengths L, L // 2 (>= 1) and 1, L = min(12, n_positions // 4)
    (at least 1), so a left-padded batch holds rows of three different lengths wherever the context allows."""
    rng = np.random.default_rng(seed)
    longest = max(1, min(12, n_positions // 4))
    return [rng.integers(0, vocab_size, n).tolist() for n in (longest, max(1, longest // 2), 1)]


def steps_that_fit(prompts: list[list[int]], n_positions: int, steps: int) -> int:
    return max(0, min(steps, n_positions - max(len(p) for p in prompts)))


@dataclass
class StepOutputs:
    """One side's outputs at one step.

    main: (real positions, width) float32, rows in (batch row, position) order; last: (B,) index of each batch
    row's last position in `main`; present_stats: (layers, 2, 4) float64 or None for a graph without a cache.
    """

    main: np.ndarray
    last: np.ndarray
    present_stats: np.ndarray | None


@dataclass
class TeacherForced:
    """A teacher-forced run: prompts, the tokens fed at each decode step (steps, B), and each step's outputs."""

    prompts: list[list[int]]
    tokens: np.ndarray
    steps: list[StepOutputs] = field(default_factory=list)


def present_stats(presents: list[np.ndarray], mask: np.ndarray, sequence_axis: int, head_dim: int) -> np.ndarray:
    """(layers, 2, 4): per layer, for the key half and the value half of the merged cache, STATS over every real
    position (mask (B, S) == 1). presents: MQA (B, S, 2D) or MHA (B, H, S, 2D) each."""
    out = np.zeros((len(presents), 2, len(STATS)), dtype=np.float64)
    real = mask.astype(bool)
    for layer, present in enumerate(presents):
        p = np.asarray(present, dtype=np.float64)
        if sequence_axis == 2:  # MHA (B, H, S, 2D) -> (B, S, H, 2D)
            p = p.transpose(0, 2, 1, 3)
        rows = p[real]  # (real positions, [H,] 2D)
        for half, part in enumerate((rows[..., :head_dim], rows[..., head_dim:])):
            values = part.reshape(-1)
            if values.size == 0:
                continue
            out[layer, half] = (values.mean(), np.abs(values).mean(), np.sqrt((values**2).mean()), np.abs(values).max())
    return out


def teacher_forced(
    run: Run, manifest: Manifest, prompts: list[list[int]], tokens: np.ndarray | None, steps: int
) -> TeacherForced:
    """Run one side over the prompts and `steps` cached decode steps, feeding back its own presents.

    tokens: (steps, B) int64 ids to feed at each decode step, or None to feed this side's own greedy choice (the
    argmax of the main output at each row's last position; the reference's role). A graph without a cache, or a
    task other than causal-lm without given tokens, runs the prefill only. A candidate whose logits cover the last
    position only (manifest.logits_positions == "last") records that position only.
    """
    past_names, present_names = manifest.past_names(), manifest.present_names()
    main_name = manifest.main_output
    if not past_names:
        steps = 0
    if tokens is None and manifest.task != "causal-lm":
        steps = 0
    ids, mask = left_pad(prompts)
    batch = len(prompts)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if past_names:
        feeds.update(Bundle.empty_past_for(manifest, batch))
    new_mask = mask
    fed: list[np.ndarray] = []
    result = TeacherForced(prompts=[list(p) for p in prompts], tokens=np.zeros((0, batch), dtype=np.int64))
    for step in range(steps + 1):
        past_length = feeds["attention_mask"].shape[1] - feeds["input_ids"].shape[1]
        if "position_ids" in manifest.input_names:
            feeds["position_ids"] = position_ids(feeds["attention_mask"], past_length)
        out = run(feeds)
        main = np.asarray(out[main_name], dtype=np.float32)
        if main.ndim == 3:
            real = new_mask.astype(bool)
            if main.shape[1] != real.shape[1]:  # last-token logits: (B, 1, V)
                real = real[:, -1:]
            rows = main[real]  # (real positions, width)
            last = np.cumsum(real.sum(axis=1)) - 1  # left padding: each row's last position is its last real one
        else:  # pooled (B, labels)
            rows, last = main, np.arange(main.shape[0])
        stats = None
        if present_names:
            kv = manifest.kv_cache
            stats = present_stats(
                [out[n] for n in present_names], feeds["attention_mask"], kv.sequence_axis, kv.head_dim
            )
        result.steps.append(StepOutputs(rows, last.astype(np.int64), stats))
        if step == steps:
            break
        next_ids = (
            rows[last].argmax(-1).astype(np.int64) if tokens is None else np.asarray(tokens[step], dtype=np.int64)
        )  # (B,)
        fed.append(next_ids)
        new_mask = np.ones((batch, 1), dtype=np.int64)
        feeds = {
            "input_ids": next_ids[:, None],
            "attention_mask": np.concatenate([feeds["attention_mask"], new_mask], axis=1),
            **{p: out[q] for p, q in zip(past_names, present_names)},
        }
    result.tokens = np.stack(fed) if fed else np.zeros((0, batch), dtype=np.int64)
    return result


@dataclass
class ReferenceOutputs:
    """What a candidate is judged against: the fp32 reference's teacher-forced run, its greedy continuation, and
    (for a reduced-precision bundle) the same-dtype torch model's error to it per step: main (max abs, mean abs)
    and present statistics (layers, 2, 4) absolute differences. `kind` says where it came from (stored / live)."""

    run: TeacherForced
    greedy: list[list[int]] | None
    model_dtype: str
    kind: str
    main_error: np.ndarray | None = None  # (steps + 1, 2): the dtype model's max abs and mean abs error
    stats_error: np.ndarray | None = None  # (steps + 1, layers, 2, 4)

    def to_tensors(self) -> dict[str, np.ndarray]:
        tensors = {
            "prompt_ids": np.concatenate([np.asarray(p, dtype=np.int64) for p in self.run.prompts]),
            "prompt_lengths": np.asarray([len(p) for p in self.run.prompts], dtype=np.int64),
            "tokens": self.run.tokens.astype(np.int64),
            "greedy": np.asarray(self.greedy, dtype=np.int64).reshape(len(self.greedy), -1)
            if self.greedy
            else np.zeros((0, 0), dtype=np.int64),
        }
        for i, s in enumerate(self.run.steps):
            tensors[f"step{i}.main"] = np.ascontiguousarray(s.main, dtype=np.float32)
            tensors[f"step{i}.last"] = s.last.astype(np.int64)
            if s.present_stats is not None:
                tensors[f"step{i}.present_stats"] = s.present_stats.astype(np.float64)
        if self.main_error is not None:
            tensors["main_error"] = self.main_error.astype(np.float64)
        if self.stats_error is not None:
            tensors["stats_error"] = self.stats_error.astype(np.float64)
        return tensors

    def save(self, bundle_dir: Path, file: str) -> ReferenceRecord:
        """Write the safetensors file into bundle_dir; returns the manifest's record of it (with its sha256)."""
        path = Path(bundle_dir) / file
        save_file(self.to_tensors(), str(path), metadata={"model_dtype": self.model_dtype})
        path.chmod(0o644)  # a shipped artifact: readable like the bundle's other files
        return ReferenceRecord(
            file=file,
            sha256=sha256_file(path),
            prompts=self.run.prompts,
            steps=len(self.run.steps) - 1,
            dtype="fp32",
            model_dtype=self.model_dtype,
            greedy_tokens=len(self.greedy[0]) if self.greedy else 0,
            bytes=path.stat().st_size,
        )

    @classmethod
    def load(cls, bundle: Bundle) -> ReferenceOutputs:
        """The bundle's stored reference, checked against the manifest's sha256 and prompts.

        Raises BundleError when the bundle has none, the file is missing, changed or unreadable."""
        record = bundle.manifest.reference
        if record is None:
            raise BundleError(
                f"{bundle.path} has no stored reference outputs (exported without them); verify it with "
                "--model MODEL_DIR against the live torch reference, or re-export it"
            )
        path = bundle.path / record.file
        if Path(record.file).name != record.file or not path.is_file():
            raise BundleError(f"{path} (the stored reference outputs) is missing from the bundle; re-export it")
        if sha256_file(path) != record.sha256:
            raise BundleError(f"{path} does not match the sha256 in manifest.json; re-export the bundle")
        config = bundle.manifest.config
        recipe = reference_prompts(config["vocab_size"], config["n_positions"])
        if len(record.prompts) != len(recipe) or any(len(p) > len(r) for p, r in zip(record.prompts, recipe)):
            raise BundleError(f"{path}: the recorded prompts are not the recipe's (3 prompts, 12/6/1 tokens at most)")
        cache_steps = bundle.manifest.kv_cache is not None and bundle.manifest.task == "causal-lm"
        expected_steps = steps_that_fit(record.prompts, config["n_positions"], STEPS) if cache_steps else 0
        if record.steps != expected_steps:
            raise BundleError(
                f"{path}: manifest.json records {record.steps} decode steps where the recipe runs {expected_steps}; "
                "re-export the bundle"
            )
        if path.stat().st_size > _size_bound(bundle.manifest, record):
            raise BundleError(f"{path} is larger than a reference of this model can be; re-export the bundle")
        try:
            t = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            raise BundleError(f"{path} is not a readable safetensors file ({exc}); re-export the bundle") from None
        try:
            lengths = [int(n) for n in t["prompt_lengths"].tolist()]
            flat = t["prompt_ids"].tolist()
            prompts, start = [], 0
            for n in lengths:
                prompts.append(flat[start : start + n])
                start += n
            steps = [
                StepOutputs(t[f"step{i}.main"], t[f"step{i}.last"], t.get(f"step{i}.present_stats"))
                for i in range(record.steps + 1)
            ]
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise BundleError(f"{path} is not a readable reference file ({exc}); re-export the bundle") from None
        if prompts != record.prompts:
            raise BundleError(f"{path} holds other prompts than manifest.json records; re-export the bundle")
        if f"step{record.steps + 1}.main" in t:
            raise BundleError(f"{path} holds more steps than manifest.json's reference.steps; re-export the bundle")
        known = {"prompt_ids", "prompt_lengths", "tokens", "greedy", "main_error", "stats_error"}
        known |= {f"step{i}.{k}" for i in range(record.steps + 1) for k in ("main", "last", "present_stats")}
        if set(t) - known or len(flat) != sum(lengths) or t["prompt_lengths"].dtype.kind not in "iu":
            raise BundleError(f"{path} holds other tensors than a reference file has; re-export the bundle")
        reference = cls(
            run=TeacherForced(prompts=prompts, tokens=t.get("tokens"), steps=steps),
            greedy=t["greedy"].tolist() if "greedy" in t else None,
            model_dtype=record.model_dtype,
            kind="stored",
            main_error=t.get("main_error"),
            stats_error=t.get("stats_error"),
        )
        reference.check(bundle.manifest, str(path), BundleError)
        return reference

    def check(self, manifest: Manifest, where: str, error: type[Exception]) -> None:
        """Shapes, id ranges and finiteness of every array against the manifest. A reference that is not finite or
        does not fit cannot judge anything: raises `error` (BundleError for a stored file, ParityError for a live
        torch run) naming `where` and the first problem."""
        config = manifest.config
        vocab, batch = config["vocab_size"], len(self.run.prompts)
        layers = manifest.kv_cache.num_layers if manifest.kv_cache else 0
        n_steps = len(self.run.steps) - 1

        def fail(what: str) -> Exception:
            fix = "re-export the bundle" if error is BundleError else "check the checkpoint (a broken weight?)"
            return error(f"{where}: {what}; {fix}")

        def ids_ok(a) -> bool:
            a = np.asarray(a)
            return a.dtype.kind in "iu" and (a.size == 0 or (a.min() >= 0 and a.max() < vocab))

        if batch == 0 or any(len(p) == 0 or not ids_ok(p) for p in self.run.prompts):
            raise fail("the prompts are empty or hold ids outside the vocabulary")
        if max(len(p) for p in self.run.prompts) + n_steps > config["n_positions"]:
            raise fail("the prompts and steps exceed the model's context")
        tokens = self.run.tokens
        if tokens is None or np.shape(tokens) != (n_steps, batch) or not ids_ok(tokens):
            raise fail(f"the step tokens are not ({n_steps}, {batch}) ids in the vocabulary")
        greedy = np.asarray(self.greedy if self.greedy is not None else 0)
        if self.greedy is None or (
            greedy.size and (greedy.ndim != 2 or greedy.shape[0] != batch or not ids_ok(greedy))
        ):
            raise fail("the greedy continuation is not one row of ids in the vocabulary per prompt")
        width = manifest.output(manifest.main_output).shape[-1]
        per_position = len(manifest.output(manifest.main_output).shape) == 3  # (B, T, width), not pooled (B, labels)
        for i, step in enumerate(self.run.steps):
            main = np.asarray(step.main)
            if main.ndim != 2 or (isinstance(width, int) and main.shape[1] != width) or main.shape[0] == 0:
                raise fail(f"step {i}'s {manifest.main_output} has shape {main.shape}, not (positions, {width})")
            lengths = [len(p) for p in self.run.prompts] if i == 0 and per_position else [1] * batch
            last = np.asarray(step.last)
            if (
                main.shape[0] != sum(lengths)
                or last.dtype.kind not in "iu"
                or not np.array_equal(last, np.cumsum(lengths) - 1)
            ):
                raise fail(f"step {i}'s rows or last-position index do not follow the prompts' real positions")
            if not np.isfinite(main).all():
                raise fail(
                    f"step {i}'s {manifest.main_output} holds {int((~np.isfinite(main)).sum())} non-finite values"
                )
            if layers:
                stats = step.present_stats
                if stats is None or stats.shape != (layers, 2, len(STATS)) or not np.isfinite(stats).all():
                    raise fail(f"step {i}'s present statistics are missing, of the wrong shape, or not finite")
        if manifest.dtype != "fp32" and self.model_dtype == manifest.dtype:
            if self.main_error is None or self.main_error.shape != (n_steps + 1, 2):
                raise fail(f"the torch {manifest.dtype} error terms are missing or of the wrong shape")
            errors = [self.main_error] + ([self.stats_error] if layers else [])
            if layers and (self.stats_error is None or self.stats_error.shape != (n_steps + 1, layers, 2, len(STATS))):
                raise fail(f"the torch {manifest.dtype} present-statistics error terms are missing or misshapen")
            if any(not np.isfinite(e).all() or (e < 0).any() for e in errors):
                raise fail(f"the torch {manifest.dtype} error terms are not finite non-negative numbers")
            # The relative criterion scales from these: they must be small next to what they describe, or a broken
            # reference with huge error terms would pass anything. fp16/bf16 measure 0.2-5% of the largest logit.
            scale = [np.abs(s.main).max() for s in self.run.steps]
            if any(e[0] > MAX_ERROR_SHARE * m for e, m in zip(self.main_error, scale)):
                raise fail(
                    f"the torch {manifest.dtype} error terms exceed {MAX_ERROR_SHARE:g} of the logits' magnitude"
                )


def _size_bound(manifest: Manifest, record) -> int:
    """The most bytes a stored reference of this bundle can take (the recipe's prompts and steps, fp32 main
    outputs, float64 statistics and error terms, int64 ids), with room for the safetensors header."""
    width = manifest.output(manifest.main_output).shape[-1]
    width = width if isinstance(width, int) else manifest.config["n_embd"]
    batch, steps = len(record.prompts), record.steps
    rows = sum(len(p) for p in record.prompts) + steps * batch
    layers = manifest.kv_cache.num_layers if manifest.kv_cache else 0
    floats = 4 * rows * width + 8 * (steps + 1) * (2 + 2 * layers * 2 * len(STATS))
    ints = 8 * (rows + batch * (steps + 2 + GREEDY_TOKENS))
    return floats + ints + 64 * 1024
