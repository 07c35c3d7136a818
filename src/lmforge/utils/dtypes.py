"""torch dtypes written in files by name ("float32", "bfloat16") and read back, checked."""

from __future__ import annotations

import torch

from lmforge.utils.errors import LmforgeError


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> "float32" (the name config files and safetensors metadata use)."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: object) -> torch.dtype:
    """The torch dtype called `name` ("float32", "bfloat16", ...); an `LmforgeError` naming it otherwise."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise LmforgeError(f"{name!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return dtype
