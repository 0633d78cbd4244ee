"""Load a Hugging Face GPTBigCode checkpoint directory into the reference model.

Formats: model.safetensors; sharded safetensors with model.safetensors.index.json; pytorch_model.bin
(+ index), read with weights_only. Every expected tensor is checked for presence and shape before the model is
used; nothing is silently left randomly initialised. The model is built on the meta device and tensors are
assigned as read, so peak memory stays near one copy of the weights in the target dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.dtypes import TORCH_DTYPES
from bigcode_deploy.exporter.model import build_model
from bigcode_deploy.runtime.errors import CheckpointError, ConfigError
from bigcode_deploy.runtime.hashing import sha256_files

# Keys a checkpoint may hold that no task here loads: buffers older transformers saved, and the heads of
# other tasks (a causal-lm file loaded as a base model, say).
IGNORED_KEYS = (
    re.compile(r"^transformer\.bias$"),
    re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$"),
    re.compile(r"^(lm_head|score|classifier)\.(weight|bias)$"),
)
# The base model's own parameters, as named when it is saved bare (no "transformer." prefix).
BASE_PREFIX = "transformer."
BASE_KEY = re.compile(r"^(wte|wpe|ln_f|h\.\d+)\.")

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def default_model_dir() -> Path:
    """The embedded default model shipped inside the package (used when no MODEL_DIR is given)."""
    return Path(str(resources.files("bigcode_deploy.exporter") / "default_model"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, in load order (one file, or every shard an index names)."""
    for name in INDEX_FILES:
        index_path = model_dir / name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{index_path} is not a valid shard index ({exc!r}): re-save the checkpoint"
                ) from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointError(f"{index_path} names shard {missing[0]}, which is not in {model_dir}")
            return [model_dir / s for s in shards]
    for name in SINGLE_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(f"no weights in {model_dir}: expected one of {', '.join(SINGLE_FILES + INDEX_FILES)}")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """config.json and the weight files: what a manifest's source record hashes. Raises CheckpointError when either
    is missing."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"no config.json in {model_dir}: it is not a checkpoint directory")
    return [model_dir / "config.json", *weight_files(model_dir)]


def checkpoint_sha256(model_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} of the checkpoint's config.json and weight files (the one helper for both)."""
    return sha256_files(checkpoint_files(model_dir))


def source_record(model_dir: str | Path) -> dict[str, Any]:
    """The manifest's `source`: the checkpoint directory (resolved, absolute) and its files' sha256."""
    return {"model_dir": str(Path(model_dir).resolve()), "sha256": checkpoint_sha256(model_dir)}


def check_source(model_dir: str | Path, source: dict[str, Any]) -> None:
    """Raise CheckpointError (one line, naming the files) unless model_dir's checkpoint files have the sha256 the
    manifest's `source` records. model_dir is the recorded checkpoint or another directory (--model); either must
    hold the same files. A record without sha256 (an older manifest) is not checked."""
    recorded = source.get("sha256") or {}
    if not recorded:
        return
    model_dir = Path(model_dir)
    current = checkpoint_sha256(model_dir)
    if current == recorded:
        return
    changed = sorted(name for name in recorded.keys() & current.keys() if recorded[name] != current[name])
    parts = [f"{', '.join(changed)} differ{'s' if len(changed) == 1 else ''} (sha256)"] if changed else []
    if recorded.keys() - current.keys():
        parts.append(f"{', '.join(sorted(recorded.keys() - current.keys()))} missing")
    if current.keys() - recorded.keys():
        parts.append(f"{', '.join(sorted(current.keys() - recorded.keys()))} not in the recorded checkpoint")
    recorded_dir = source.get("model_dir")
    if recorded_dir and Path(recorded_dir).resolve() == model_dir.resolve():
        raise CheckpointError(
            f"the checkpoint {model_dir} changed since the bundle was exported: {'; '.join(parts)}; re-export the "
            "bundle from it"
        )
    raise CheckpointError(
        f"{model_dir} is not the checkpoint the bundle was exported from ({recorded_dir}): {'; '.join(parts)}"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in one weight file; a truncated or corrupt file is one clear error."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc} (the file is truncated or corrupt; re-save it)") from None
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"cannot read {path}: {exc} (the file is truncated or corrupt; re-save it)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    yield from state.items()


def canonical_key(name: str, has_base_prefix: bool) -> str:
    """The key as the task models name it: a bare base model's keys get the "transformer." prefix."""
    if has_base_prefix and BASE_KEY.match(name):
        return BASE_PREFIX + name
    return name


def load_model(
    model_dir: str | Path | None = None, task: str = "causal-lm", dtype: str = "fp32"
) -> tuple[nn.Module, GPTBigCodeConfig]:
    """Build the task's reference model from a checkpoint directory, in eval mode, in the given dtype."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    torch_dtype = parse_dtype(dtype)
    config = GPTBigCodeConfig.from_json_file(model_dir / "config.json")
    with torch.device("meta"):
        model = build_model(config, task)
    # Base model: its parameters carry no prefix; task models: "transformer." + base parameter names.
    prefixed = task != "base"
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    tied = "lm_head.weight" in expected and config.tie_word_embeddings
    if tied:
        del expected["lm_head.weight"]

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in weight_files(model_dir):
        for raw_name, tensor in iter_tensors(path):
            name = canonical_key(raw_name, has_base_prefix=prefixed)
            if not prefixed and name.startswith(BASE_PREFIX) and name[len(BASE_PREFIX) :] in expected:
                name = name[len(BASE_PREFIX) :]
            if name not in expected:
                if not any(p.match(name) or p.match(canonical_key(raw_name, True)) for p in IGNORED_KEYS):
                    unexpected.append(f"{raw_name} (in {path.name})")
                continue
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"tensor {raw_name} in {path.name} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(expected[name])}: the weights and config.json do not belong together"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                # Every weight, not only those the reference prompts reach: a NaN in a position embedding row
                # past the prompts' lengths would pass any parity check and break generation later.
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(
                    f"tensor {raw_name} in {path.name} holds {bad} non-finite value(s) (NaN or inf): the checkpoint "
                    "is broken; re-save it from a good copy"
                )
            loaded[name] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + f": {model_dir} does not hold a GPTBigCode model matching config.json"
        )
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]} is missing from {model_dir}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f": the checkpoint does not hold the weights task {task!r} needs"
        )
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    return model, config


def save_checkpoint(model: nn.Module, config: GPTBigCodeConfig, model_dir: str | Path) -> Path:
    """Write a checkpoint this loader (and transformers) reads: model.safetensors with the model's own tensor names
    (the tied lm_head left out, as transformers saves it) and config.json (model_type gpt_bigcode, every field,
    architectures and torch_dtype from the model). The one save function for scripts, tests and benchmarks."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tied = config.tie_word_embeddings
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    architectures = ["GPTBigCodeForCausalLM"] if hasattr(model, "lm_head") else []
    raw = {**config.to_dict(), "architectures": architectures, "torch_dtype": dtype}
    (model_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return model_dir
