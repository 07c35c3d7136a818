"""`lmforge quantize`'s methods behind one call: every option checked against the method and the model before any
work, then the method run on the model in place.

    method        what the layers become                                   calibration   bits    group size
    int8          QuantLinear, absmax int8 per output row (RTN)             no            8       per row
    rtn           QuantLinear, round to nearest                             no            4 | 8   g (128)
    gptq          QuantLinear, GPTQ's codes (quant/gptq.py)                 yes           4 | 8   g (128)
    awq           QuantLinear, AWQ's scales folded, its codes (awq.py)      yes           4 | 8   g (128)
    llm-int8      Int8Linear, LLM.int8() with outlier columns in float      no            8       per row
    smoothquant   W8A8Linear, smoothed int8 weights and activations         yes           8       per row
    q8_0 ... q4_k the float model, written as that GGUF type (io/gguf_export) no           (the format's)

Every method quantizes the projections inside the blocks; the embeddings and the LM head stay as they are (a GGUF
type covers every matrix, as llama.cpp's converter). A group size of 0 means one scale per output row. GPTQ's
act-order packs with static groups (the groups stay consecutive columns: quant/gptq.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.quant.primitives import QuantError

__all__ = ["CALIBRATED", "GGUF_METHODS", "METHODS", "QuantizeOptions", "quantize_model"]

GGUF_METHODS = ("q8_0", "q4_0", "q4_1", "q4_k")
METHODS = ("int8", "llm-int8", "gptq", "awq", "smoothquant", "rtn", *GGUF_METHODS)
CALIBRATED = ("gptq", "awq", "smoothquant")
_GROUPED = ("rtn", "gptq", "awq")  # the methods that take --bits 4|8 and --group-size
DEFAULT_GROUP = 128
DEFAULT_WINDOW = 512


@dataclass
class QuantizeOptions:
    """A method and its options (module doc); None is the method's default."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    act_order: bool = False
    symmetric: bool = False
    samples: int = 128  # calibration windows
    seq_len: int | None = None  # tokens per calibration window (None: 512, or the model's context if shorter)
    threshold: float = 6.0  # LLM.int8()'s outlier threshold
    alpha: float = 0.5  # SmoothQuant's migration strength
    activations: str = "per_token"  # SmoothQuant: per_token (dynamic) or per_tensor (static, calibrated)

    @property
    def gguf(self) -> bool:
        return self.method in GGUF_METHODS

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED

    def window_len(self, model: nn.Module) -> int:
        """Tokens per calibration window for `model`."""
        return min(DEFAULT_WINDOW, model.config.max_seq_len) if self.seq_len is None else self.seq_len

    @property
    def packed_bits(self) -> int:
        return self.bits if self.bits is not None else 4

    @property
    def group(self) -> int | None:
        """The group size a grouped method uses: None for one scale per row."""
        g = DEFAULT_GROUP if self.group_size is None else self.group_size
        return None if g == 0 else g

    def check(self, model: nn.Module) -> None:
        """Every combination this method cannot take, refused with the option's name (nothing has run yet)."""
        m = self.method
        if m not in METHODS:
            raise QuantError(f"--method={m!r}: choose one of {', '.join(METHODS)}")
        if self.act_order and m != "gptq":
            raise QuantError(f"--act-order: is GPTQ's option, not {m}'s")
        if self.symmetric and m not in ("rtn", "gptq"):
            raise QuantError(f"--symmetric: is an option of rtn and gptq, not {m}")
        if m in _GROUPED:
            if self.packed_bits not in (4, 8):
                raise QuantError(f"--bits={self.bits}: {m} packs 4- or 8-bit codes")
            g = self.group
            if g is not None and g < 1:
                raise QuantError(f"--group-size={self.group_size}: must be a positive number of input columns, or 0 "
                                 "for one scale per output row")  # fmt: skip
            for name, layer in model.named_modules():
                if name.startswith("blocks.") and isinstance(layer, nn.Linear) and g and layer.in_features % g:
                    raise QuantError(f"--group-size={g}: does not divide the {layer.in_features} input features of "
                                     f"{name}")  # fmt: skip
        else:
            fixed = "the format fixes them" if self.gguf else "it is 8-bit with one scale per row"
            if self.bits not in (None, 8) or (self.gguf and self.bits is not None):
                raise QuantError(f"--bits={self.bits}: {m} takes no --bits ({fixed})")
            if self.group_size is not None:
                raise QuantError(f"--group-size={self.group_size}: {m} takes no --group-size ({fixed})")
        if self.calibrated:
            seq_len = self.window_len(model)
            if self.samples < 1 or seq_len < 2:
                raise QuantError(f"--calib-samples={self.samples} --calib-len={seq_len}: need >= 1 window of "
                                 ">= 2 tokens")  # fmt: skip
            limit = model.config.max_seq_len
            if seq_len > limit:
                raise QuantError(f"--calib-len={self.seq_len}: longer than the model's context ({limit})")
        if m in ("awq", "smoothquant"):
            from lmforge.quant.awq import scaling_plan

            scaling_plan(model, "blocks.*", self.group if m == "awq" else None, method=m)  # MoE, MLA... refused


def quantize_model(model: nn.Module, options: QuantizeOptions, calibration: Tensor | None = None, *,
                   progress: bool = True) -> list[str]:  # fmt: skip
    """Run `options.method` on `model` in place (a GGUF method leaves it float: the type applies when it is
    written) and return the names of the layers it quantized. `calibration` is the token stream (1-D) the
    calibrated methods cut into `options.samples` windows of `options.window_len(model)` tokens; the others refuse
    one."""
    from lmforge.quant.calibration import calibration_windows

    options.check(model)
    if options.calibrated != (calibration is not None):
        need = "needs calibration text (--calib FILE)" if options.calibrated else "takes no calibration text"
        raise QuantError(f"--method={options.method}: {need}")
    seq_len = options.window_len(model)
    windows = None if calibration is None else calibration_windows(calibration, options.samples, seq_len)
    from lmforge.quant.modules import quantized_layers

    before = set(quantized_layers(model))
    with torch.no_grad():
        _run(model, options, windows, progress)
    return sorted(set(quantized_layers(model)) - before)



def _run(model: nn.Module, o: QuantizeOptions, windows: Tensor | None, progress: bool) -> None:
    from lmforge.quant import awq, gptq, llm_int8, rtn, smoothquant

    if o.method == "int8":
        rtn.rtn_quantize_model(model, bits=8, group_size=None, symmetric=True)
    elif o.method == "rtn":
        rtn.rtn_quantize_model(model, bits=o.packed_bits, group_size=o.group, symmetric=o.symmetric)
    elif o.method == "gptq":
        gptq.gptq_quantize_model(model, windows, bits=o.packed_bits, group_size=o.group, act_order=o.act_order,
                                 static_groups=o.act_order and o.group is not None, symmetric=o.symmetric,
                                 progress=progress, pack=True)  # fmt: skip
    elif o.method == "awq":
        awq.awq_quantize_model(model, windows, bits=o.packed_bits, group_size=o.group, progress=progress, pack=True)
    elif o.method == "llm-int8":
        llm_int8.quantize_model_llm_int8(model, threshold=o.threshold)
    elif o.method == "smoothquant":
        smoothquant.quantize_model_smoothquant(model, windows, alpha=o.alpha, activations=o.activations,
                                               progress=progress)  # fmt: skip
