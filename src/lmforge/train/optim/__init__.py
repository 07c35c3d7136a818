"""Optimizers, written out: AdamW, Adam, SGD, Lion, Adafactor, Muon and 8-bit AdamW, one family per file.

Each file opens with the update equations of its optimizer and the reference it matches (notation: p parameter,
g gradient, negated when `maximize`, t the step count starting at 1, lr the group's learning rate, wd its weight
decay):
    base.py        `_Optimizer` (the shared step loop over parameters with a gradient), argument checks, `state_bytes`
    adam.py        Adam, AdamW (Adam with decoupled decay), and the Adam(W) step Muon and 8-bit AdamW reuse
    sgd.py         SGD with momentum, dampening and Nesterov
    lion.py        Lion
    adafactor.py   Adafactor (factored second moments)
    muon.py        Muon (+ AdamW for non-hidden parameters), `zeropower_via_newtonschulz`
    adamw8bit.py   8-bit AdamW and its block-wise quantizer (`quantize_blockwise`, `dequantize_blockwise`)
    groups.py      `param_groups`: decay on matrices only, Muon/AdamW routing
    registry.py    `OPTIMIZERS` by name and `build_optimizer`
"""

from lmforge.train.optim.adafactor import Adafactor
from lmforge.train.optim.adam import Adam, AdamW
from lmforge.train.optim.adamw8bit import BLOCK_SIZE, AdamW8bit, dequantize_blockwise, quantize_blockwise
from lmforge.train.optim.base import state_bytes
from lmforge.train.optim.groups import param_groups
from lmforge.train.optim.lion import Lion
from lmforge.train.optim.muon import NS_COEFFICIENTS, Muon, zeropower_via_newtonschulz
from lmforge.train.optim.registry import OPTIMIZERS, build_optimizer
from lmforge.train.optim.sgd import SGD

__all__ = [
    "BLOCK_SIZE",
    "NS_COEFFICIENTS",
    "OPTIMIZERS",
    "SGD",
    "Adafactor",
    "Adam",
    "AdamW",
    "AdamW8bit",
    "Lion",
    "Muon",
    "build_optimizer",
    "dequantize_blockwise",
    "param_groups",
    "quantize_blockwise",
    "state_bytes",
    "zeropower_via_newtonschulz",
]
