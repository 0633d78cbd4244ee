"""Load a Hugging Face GPTBigCode checkpoint directory into the reference model.

Formats: model.safetensors; sharded safetensors with model.safetensors.index.json; pytorch_model.bin
(+ index), read with weights_only. Every expected tensor is checked for presence and shape before the model is
used; nothing is silently left randomly initialised. The model is built on the meta device and tensors are
assigned as read, so peak memory stays near one copy of the weights in the target dtype.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.dtypes import TORCH_DTYPES, weight_problem
from bigcode_deploy.exporter.model import build_model
from bigcode_deploy.exporter.santacoder_format import SANTACODER_FORMAT, WeightMapper
from bigcode_deploy.runtime.bounded_file import read_json
from bigcode_deploy.runtime.errors import CheckpointError, ConfigError
from bigcode_deploy.runtime.hashing import sha256_files
from bigcode_deploy.runtime.manifest_schema import short
from bigcode_deploy.runtime.staging import require_utf8_path

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
MAX_INDEX_BYTES = 64 << 20  # a shard index (StarCoder's: 60 kB)
LAYER_KEY = re.compile(r"(?:^|\.)h\.(\d{1,9})\.")  # the layer number in a block's tensor name


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
            shards = index_shards(index_path)
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointError(f"{index_path} names shard {missing[0]}, which is not in {model_dir}")
            return [model_dir / s for s in shards]
    for name in SINGLE_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(f"no weights in {model_dir}: expected one of {', '.join(SINGLE_FILES + INDEX_FILES)}")


def index_shards(index_path: Path) -> list[str]:
    """The shard file names a shard index's weight_map names, sorted. Raises CheckpointError (one line) unless the
    file is a JSON object whose weight_map maps tensor names (strings) to plain file names of this directory with
    the index's own suffix (no directory part: a shard never comes from outside the checkpoint)."""
    fix = "re-save the checkpoint (transformers' save_pretrained writes a valid one)"
    raw = read_json(index_path, limit=MAX_INDEX_BYTES, error=CheckpointError, fix=fix)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path} is not a shard index: it needs a non-empty object weight_map of tensor name -> shard "
            f"file; {fix}"
        )
    suffix = ".safetensors" if index_path.name.startswith("model.safetensors") else ".bin"
    for name, shard in weight_map.items():
        plain = isinstance(shard, str) and shard == Path(shard).name and shard not in ("", ".", "..")
        if not plain or not shard.endswith(suffix) or "\0" in shard:
            raise CheckpointError(
                f"{index_path}: weight_map[{short(name)}] = {short(shard)} is not a {suffix} file name in the "
                f"checkpoint directory; {fix}"
            )
    return sorted(set(weight_map.values()))


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


def check_same_model(model_dir: str | Path, bundle_config: dict[str, Any]) -> None:
    """Raise CheckpointError (one line, before any weight is read) unless model_dir's config.json describes the
    bundle's model: the same vocabulary, context, width, layers, heads and attention kind. A checkpoint of another
    vocabulary given to `verify --model` is refused here, by name, rather than by a failed comparison later."""
    config = GPTBigCodeConfig.from_json_file(Path(model_dir) / "config.json")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "multi_query"):
        if getattr(config, name) != bundle_config.get(name):
            raise CheckpointError(
                f"{model_dir} holds another model: its config.json has {name}={getattr(config, name)}, the bundle's "
                f"{short(bundle_config.get(name))}; pass the checkpoint the bundle was exported from"
            )


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
            raise CheckpointError(
                f"cannot read {path}: {_first_line(exc)} (the file is truncated or corrupt; re-save it)"
            ) from None
        return
    yield from _torch_state_dict(path).items()


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor in one weight file, without reading tensor data: safetensors' header, or a
    torch file's pickle (its storages memory-mapped, or a legacy file's read once). Raises CheckpointError as
    iter_tensors does."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot read {path}: {_first_line(exc)} (the file is truncated or corrupt; re-save it)"
            ) from None
    return {name: tuple(t.shape) for name, t in _torch_state_dict(path).items()}


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's state dict, loaded with weights_only (tensors and plain containers, never code):
    memory-mapped for the zip format torch.save writes since 1.6, read into memory for the legacy format."""
    zip_format = zipfile.is_zipfile(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as exc:  # torch.load raises many types for a damaged file
        text = str(exc)
        refused = re.search(r"GLOBAL (\S+)", text)  # weights_only refused a global: loading it would run code
        if isinstance(exc, pickle.UnpicklingError) and (refused or "Can only build" in text):
            what = f" ({short(refused.group(1))})" if refused else ""
            raise CheckpointError(
                f"cannot read {path}: it holds Python objects{what} besides tensors, which are not loaded since a "
                "pickle can run code; convert the checkpoint to model.safetensors from a copy you trust"
            ) from None
        # torch's weights_only message advises turning weights_only off: never repeated here
        operand = re.search(r"Unsupported operand \S+", text)
        reason = operand.group(0) if operand else "not a pickle" if "Weights only" in text else _first_line(exc)
        kind = "zip-format torch file" if zip_format else "torch file (neither zip nor legacy format)"
        raise CheckpointError(
            f"cannot read {path} as a {kind}: {reason} (the file is truncated or corrupt; re-save it)"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict (tensor names -> tensors); re-save the checkpoint")
    return state


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to one short line (library messages span lines and quote whole files)."""
    text = str(exc).strip()
    return short(text.splitlines()[0]).strip("'\"") if text else type(exc).__name__


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
    require_utf8_path(model_dir.absolute(), "model directory")  # absolute: the manifest records it so
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    torch_dtype = parse_dtype(dtype)
    config = GPTBigCodeConfig.from_json_file(model_dir / "config.json")
    files = weight_files(model_dir)
    check_sizes(config, task, files)  # before building: n_layer = 10**7 or a vocabulary of 2**31 fails here, at once
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
    # The original SantaCoder format's names and Conv1D layouts are mapped onto GPTBigCode's as they are read.
    mapper = WeightMapper(config.n_embd, config.head_dim) if config.source_format == SANTACODER_FORMAT else None
    for path in files:
        for raw_name, tensor in mapper(iter_tensors(path)) if mapper else iter_tensors(path):
            name = canonical_key(raw_name, has_base_prefix=prefixed)
            if not prefixed and name.startswith(BASE_PREFIX) and name[len(BASE_PREFIX) :] in expected:
                name = name[len(BASE_PREFIX) :]
            if name not in expected:
                if not any(p.match(name) or p.match(canonical_key(raw_name, True)) for p in IGNORED_KEYS):
                    unexpected.append(f"{printable(raw_name)} (in {path.name})")
                continue
            if problem := weight_problem(tensor):
                raise CheckpointError(f"tensor {printable(raw_name)} in {path.name} {problem}")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"tensor {printable(raw_name)} in {path.name} has shape {tuple(tensor.shape)} but config.json "
                    f"implies {tuple(expected[name])}: the weights and config.json do not belong together"
                )
            narrowed = tensor.to(torch_dtype)
            if not torch.isfinite(narrowed).all():  # finite as stored, beyond the export dtype's range
                raise CheckpointError(
                    f"tensor {printable(raw_name)} in {path.name} holds values beyond {dtype}'s range (largest "
                    f"{float(tensor.abs().max()):.3g}): export another --dtype or fix the checkpoint"
                )
            loaded[name] = narrowed
    if mapper:
        mapper.finish()
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


def check_sizes(config: GPTBigCodeConfig, task: str, files: list[Path]) -> None:
    """config.json's sizes against the weight files' headers (tensor_shapes: no tensor data read), before any model
    is built, so that building costs what the files hold: the number of layers (h.N) must be n_layer, wte must be
    (vocab_size, n_embd), wpe (n_positions, n_embd), layer 0's c_fc hold n_inner * n_embd values and a task head
    (lm_head, score, classifier) its rows * n_embd (element counts: the original SantaCoder format stores c_fc
    transposed). Raises CheckpointError naming the tensor, its file, the shapes and the config fields."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}  # tensor name -> (file name, shape)
    for path in files:
        shapes.update((name, (path.name, shape)) for name, shape in tensor_shapes(path).items())
    layers = {int(m.group(1)) for name in shapes if (m := LAYER_KEY.search(name))}
    if len(layers) != config.n_layer:
        raise CheckpointError(
            f"config.json declares n_layer={config.n_layer} but the weight files in {files[0].parent} "
            f"({', '.join(p.name for p in files)}) "
            f"hold {len(layers)} layer(s): the weights and config.json do not belong together"
        )
    E = config.n_embd
    exact = {
        "wte.weight": ((config.vocab_size, E), "vocab_size, n_embd"),
        "wpe.weight": ((config.n_positions, E), "n_positions, n_embd"),
    }
    rows = {"h.0.mlp.c_fc.weight": (config.n_inner, "n_inner")}
    rows.update(
        {
            "causal-lm": {"lm_head.weight": (config.vocab_size, "vocab_size")},
            "sequence-classification": {"score.weight": (config.num_labels, "num_labels")},
            "token-classification": {"classifier.weight": (config.num_labels, "num_labels")},
        }.get(task, {})
    )
    for key in [*exact, *rows]:
        name = next((n for n in (BASE_PREFIX + key, key) if n in shapes), None)
        if name is None:
            if key in exact:  # every GPTBigCode checkpoint has the embeddings; without them no size can be trusted
                raise CheckpointError(
                    f"tensor {BASE_PREFIX}{key} is missing from {', '.join(p.name for p in files)}: the checkpoint "
                    "does not hold a GPTBigCode model"
                )
            continue
        file, shape = shapes[name]
        if key in exact:
            want, fields = exact[key]
            ok = shape == want
        else:
            count, fields = rows[key]
            want, ok = (count, E), len(shape) >= 1 and math.prod(shape) == count * E
        if not ok:
            raise CheckpointError(
                f"tensor {printable(name)} in {file} has shape {shape} but config.json implies {want} "
                f"({', '.join(f'{f}={getattr(config, f)}' for f in fields.split(', '))}): the weights and config.json "
                "do not belong together"
            )


def printable(name: str) -> str:
    """A tensor name from a file, for an error line: control and non-ASCII characters escaped, cut to 120."""
    return name[:120].encode("unicode_escape").decode("ascii")


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
