"""`OPTIMIZERS`, the optimizers by the name a training config gives (`[optim] name`), and `build_optimizer`,
which builds one over `param_groups(model, weight_decay)`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from lmforge.train.optim.adafactor import Adafactor
from lmforge.train.optim.adam import Adam, AdamW
from lmforge.train.optim.adamw8bit import AdamW8bit
from lmforge.train.optim.groups import param_groups
from lmforge.train.optim.lion import Lion
from lmforge.train.optim.muon import Muon
from lmforge.train.optim.sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adamw": AdamW,
    "adam": Adam,
    "sgd": SGD,
    "lion": Lion,
    "adafactor": Adafactor,
    "muon": Muon,
    "adamw8bit": AdamW8bit,
}


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, **kwargs: Any) -> Optimizer:
    """The optimizer `name` over `param_groups(model, weight_decay)`; `kwargs` go to its constructor.

    For "muon", `lr` is Muon's learning rate and `adamw_lr` (a kwarg) that of the AdamW-routed parameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: must be one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay, muon=name == "muon")
    return OPTIMIZERS[name](groups, lr=lr, **kwargs)
