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
