"""Calibration for post-training quantization: token windows from text, and a block-by-block pass over a model.

GPTQ, AWQ and SmoothQuant quantize a layer from the activations that reach it. Holding a whole model's activations
at once costs n_layers times one block's, so the pass goes one block at a time, as the GPTQ and AWQ reference code
do: the inputs X_0 of the first block are the embedded calibration tokens; for block i, `process(i, block, X_i,
inputs)` sees the block and its inputs (and may change the block, e.g. quantize its linears); then
X_{i+1} = block(X_i) is computed with the block as `process` left it, so later blocks calibrate on what the
quantized model really feeds them (the quantization error of earlier blocks included).

`calibration_windows(ids, n, seq_len)` cuts a token stream into n non-overlapping windows of seq_len tokens (evenly
spaced, deterministic), and refuses a stream too short for them before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.model.cache import AttentionInputs, KeyLayout
from lmforge.utils.errors import LmforgeError

BlockProcessor = Callable[[int, nn.Module, Tensor, AttentionInputs], None]


class CalibrationError(LmforgeError):
    """Calibration data that cannot calibrate: too few tokens for the windows asked for."""


def calibration_windows(ids: Tensor, n: int, seq_len: int) -> Tensor:
    """(n, seq_len) windows of the 1-D token stream `ids`, evenly spaced over it, none overlapping."""
    if ids.dim() != 1:
        raise CalibrationError(f"calibration tokens must be one 1-D stream, got shape {tuple(ids.shape)}")
    if n < 1 or seq_len < 1:
        raise CalibrationError(f"calibration needs n >= 1 windows of seq_len >= 1 tokens, got n={n}, seq_len={seq_len}")
    need = n * seq_len
    if ids.numel() < need:
        raise CalibrationError(
            f"calibration data has {ids.numel()} tokens; {n} windows of {seq_len} need {need} "
            "(give more text, or fewer / shorter windows)"
        )
    stride = (ids.numel() - seq_len) // max(n - 1, 1)
    return torch.stack([ids[i * stride : i * stride + seq_len] for i in range(n)])


def window_inputs(model: nn.Module, x: Tensor) -> AttentionInputs:
    """The attention inputs of calibration windows x (n, T, d_model): positions 0 .. T-1, no padding, no cache."""
    p = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return model.attention_inputs(p, None, KeyLayout(p, None, past=0), None, None, x.dtype)


@torch.no_grad()
def run_block(model: nn.Module, block: nn.Module, x: Tensor, batch_size: int = 8) -> Tensor:
    """block(x) for calibration windows x (n, T, d_model), `batch_size` windows at a time."""
    return torch.cat([block(c, window_inputs(model, c)) for c in x.split(batch_size)])


@torch.no_grad()
def for_each_block(model: nn.Module, windows: Tensor, process: BlockProcessor, *, batch_size: int = 8,
                   progress: bool = True) -> None:  # fmt: skip
    """Run `windows` (n, T) through `model` block by block, calling `process(i, block, x, inputs)` before block i
    runs, with x (n, T, d_model) its inputs and `inputs` their attention inputs (module doc); the block then runs
    `batch_size` windows at a time. A tqdm bar counts the blocks when `progress`."""
    from tqdm.auto import tqdm

    if windows.dim() != 2:
        raise CalibrationError(f"calibration windows must be (n, T) token ids, got shape {tuple(windows.shape)}")
    positions = torch.arange(windows.shape[1], device=windows.device).expand_as(windows)
    x = model.embed_tokens(windows, positions)
    inputs = window_inputs(model, x)
    for i, block in enumerate(tqdm(model.blocks, desc="calibrating blocks", unit="block", disable=not progress)):
        process(i, block, x, inputs)
        x = run_block(model, block, x, batch_size)
