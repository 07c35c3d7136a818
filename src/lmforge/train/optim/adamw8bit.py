"""8-bit AdamW (after Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): AdamW whose moments
live as one byte per value. Each step dequantizes m and v to float32, runs the AdamW update of adam.py, and
requantizes. Quantization is block-wise: the flattened moment is cut into blocks of 256 values, each block keeps
one float32 absmax scale, so one outlier only costs precision inside its own block. Within a block the value
y = x / absmax ∈ [−1, 1] is *companded* before rounding to a uniform code:
    m (signed, int8):     code = round(127 · sign(y)·|y|^(1/2))         y = sign(code)·(|code|/127)²
    v (unsigned, uint8):  code = round(255 · y^(1/4))                   y = (code/255)⁴
A linear code would round every value under absmax/510 to zero; for v that is fatal, because √v is the
denominator and a v rounded to 0 turns m/(√v + ε) into m/ε. The power maps spend the codes on small magnitudes
(like the dynamic-exponent map of bitsandbytes, but in one line): the smallest nonzero v code stands for
absmax·(1/255)⁴ ≈ 2e-10·absmax, while the top of the range keeps ~1% relative precision. State: 2 bytes per
parameter plus 8 bytes per 256-value block, against 8 bytes for float32 AdamW (a ratio of ≈ 0.254).
The quantizer lives in quant/primitives.py (`quantize_blockwise_companded`, `dequantize_blockwise_companded`); this
module's `quantize_blockwise` / `dequantize_blockwise` are those functions, under the names train.optim exports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.quant.primitives import dequantize_blockwise_companded as dequantize_blockwise
from lmforge.quant.primitives import quantize_blockwise_companded as quantize_blockwise
from lmforge.train.optim.adam import _adam_update
from lmforge.train.optim.base import Params, _check, _check_betas, _check_common, _Optimizer

BLOCK_SIZE = 256


class AdamW8bit(_Optimizer):
    """AdamW with block-wise 8-bit moments: m as int8 (power 2 companding), v as uint8 (power 4).

    The arithmetic of a step is float32 AdamW; only the stored state is 8-bit. State keys: `exp_avg_codes`,
    `exp_avg_absmax`, `exp_avg_sq_codes`, `exp_avg_sq_absmax`, `step`.
    """

    M_POWER = 2.0
    V_POWER = 4.0
    shardable = False  # the quantization blocks are cut from the flattened local tensor, not the sharded one

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        _check_common(lr, weight_decay, eps)
        _check_betas(betas)
        _check(isinstance(block_size, int) and block_size > 0, "block_size", block_size, "a positive integer")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "block_size": block_size}
        super().__init__(params, defaults)

    def _load(self, state: dict[str, Any], key: str, signed: bool, shape: torch.Size, bs: int) -> Tensor:
        power = self.M_POWER if signed else self.V_POWER
        return dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], shape, power=power, block_size=bs)

    def _store(self, state: dict[str, Any], key: str, x: Tensor, signed: bool, bs: int) -> None:
        power = self.M_POWER if signed else self.V_POWER
        state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_blockwise(x, signed=signed, power=power, block_size=bs)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        bs = group["block_size"]
        if not state:
            state["step"] = 0
            zeros = torch.zeros(p.shape, device=p.device)
            self._store(state, "exp_avg", zeros, True, bs)
            self._store(state, "exp_avg_sq", zeros, False, bs)
        state["step"] += 1
        m = self._load(state, "exp_avg", True, p.shape, bs)
        v = self._load(state, "exp_avg_sq", False, p.shape, bs)
        _adam_update(
            p,
            grad.float(),
            m,
            v,
            state["step"],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=True,
        )
        self._store(state, "exp_avg", m, True, bs)
        self._store(state, "exp_avg_sq", v, False, bs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but keep the state's own dtypes: torch casts every state tensor to its parameter's dtype,
        which would turn the byte codes into floats (and, for bf16 parameters, round the float32 scales)."""
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in saved.get(i, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)
