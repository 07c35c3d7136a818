"""Model merging: pure functions over tensors, one module per method, and a streaming driver for mergekit YAMLs.

    linear.py            weighted average (model soups)
    slerp.py             spherical interpolation of two models, per tensor, t per layer from gradient lists
    task_arithmetic.py   task vectors (extract, add, negate) and the weighted/sign-consensus sum the rest reuse
    ties.py              TIES: trim to top-|x| density, elect sign, disjoint mean
    dare.py              DARE: random drop with p = 1 - density, rescale (mergekit's L1 rule or the paper's 1/(1-p))
    breadcrumbs.py       Model Breadcrumbs: drop the largest (outliers) and smallest entries of each task vector
    model_stock.py       Model Stock: average pulled towards the base by the fine-tunes' agreement
    lora.py              a PEFT LoRA adapter as a task vector, delta W = scaling * B @ A
    methods.py           the methods by mergekit name with their parameters' scopes and defaults
    config.py            the mergekit YAML schema (models / slices, parameters with filters and gradients)
    plan.py              the config resolved per output tensor (inputs, layer position t, parameter values)
    inputs.py            input checkpoints, memory-mapped, checked against each other before any work
    writer.py            the output written shard by shard
    driver.py            `merge(config, out)`: stream the plan through the method into the writer

Every rule is bit-identical (float32) to mergekit 0.1.5's on the same YAML (tests/merge); docs/merging.md.
"""

from lmforge.merge.breadcrumbs import breadcrumbs, breadcrumbs_ties
from lmforge.merge.config import MergeConfig, parse_config, read_config
from lmforge.merge.dare import dare, dare_linear, dare_ties
from lmforge.merge.driver import merge
from lmforge.merge.linear import linear
from lmforge.merge.lora import lora_task_vector
from lmforge.merge.methods import METHODS, MergeConfigError
from lmforge.merge.model_stock import model_stock
from lmforge.merge.slerp import slerp
from lmforge.merge.task_arithmetic import negate, task_arithmetic, task_vector
from lmforge.merge.ties import ties

__all__ = ["METHODS", "MergeConfig", "MergeConfigError", "breadcrumbs", "breadcrumbs_ties", "dare", "dare_linear",
           "dare_ties", "linear", "lora_task_vector", "merge", "model_stock", "negate", "parse_config", "read_config",
           "slerp", "task_arithmetic", "task_vector", "ties"]  # fmt: skip
