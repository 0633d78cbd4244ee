"""torch's side of the one dtype table (bigcode_deploy.runtime.manifest.GRAPH_DTYPES, which runtime code reads)."""

from __future__ import annotations

import torch

from bigcode_deploy.runtime.manifest import GRAPH_DTYPES, ONNX_TENSOR_TYPES

# fp32 / fp16 / bf16 -> torch dtype (torch names them as the manifest's tensor dtype names do).
TORCH_DTYPES = {name: getattr(torch, tensor_dtype) for name, tensor_dtype in GRAPH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "fp16". Raises KeyError for a dtype the project does not export."""
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def onnx_type(dtype: torch.dtype) -> int:
    """The ONNX TensorProto data type of a torch float dtype (torch.float16 -> 10)."""
    return ONNX_TENSOR_TYPES[GRAPH_DTYPES[dtype_name(dtype)]]


# The dtypes a checkpoint's weights may be stored in (float64 is narrowed on load). float8/float4 formats are not:
# torch cannot even test them for NaN, and their scaling conventions are not part of this model family's format.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def weight_problem(tensor: torch.Tensor) -> str | None:
    """Why a checkpoint tensor cannot be a weight (its dtype, or its count of NaN/inf values), else None."""
    if tensor.dtype not in WEIGHT_DTYPES:
        return (
            f"holds {str(tensor.dtype).removeprefix('torch.')} values: a weight must be float32, float16 or bfloat16 "
            "(float64 is narrowed); re-save the checkpoint in one of them"
        )
    if not torch.isfinite(tensor).all():
        # Every weight, not only those the reference prompts reach: a NaN in a position embedding row past the
        # prompts' lengths would pass any parity check and break generation later.
        bad = int((~torch.isfinite(tensor)).sum())
        return f"holds {bad} non-finite value(s) (NaN or inf): the checkpoint is broken; re-save it from a good copy"
    return None
