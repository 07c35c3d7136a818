"""Mixture-of-experts feed-forward (Shazeer 2017; Switch, Mixtral, Qwen-MoE, DeepSeek-V2/V3).

Each token x (d,) is sent to k of E gated experts  f_e(x) = W_down,e (act(W_gate,e x) * W_up,e x).

Router (in float32):   l = W_r x  (E logits),   s = softmax(l)  or  s = sigmoid(l)  (`scoring`)
Selection:             idx = top-k of  s + b  (b: DeepSeek-V3 score-correction bias, used for selection
                       only; b = 0 elsewhere)
Group-limited routing: the E experts form G = n_group groups; each group gets a score, "max" (DeepSeek-V2:
                       max_e s_e in the group) or "top2_sum" (DeepSeek-V3: sum of the group's two largest
                       s_e + b_e); only the experts of the topk_group best groups may be selected.
Weights:               w_i = s_idx_i (the unbiased score), optionally renormalised  w_i <- w_i / sum_j w_j
                       (`norm_topk_prob`), then times the routed scaling factor  w_i <- rho * w_i.
Output:                y = sum_i w_i f_idx_i(x)  +  shared(x)   (shared experts: one dense gated MLP that
                       every token goes through, of size n_shared * d_expert)

Auxiliary losses (the trainer multiplies them by `aux_loss_coef` / `z_loss_coef`), over N tokens:
  load balancing (Switch):  aux = E * sum_e f_e * P_e,  f_e = (# (token, slot) pairs routed to e) / (N k),
                            P_e = mean over tokens of softmax(l)_e;  aux = 1 when perfectly balanced.
                            Only P_e carries a gradient. (HF's Mixtral loss sums over slots: it equals k * aux.)
  router z-loss (ST-MoE):   z = mean over tokens of (logsumexp_e l_e)^2

Two equivalent expert paths: `forward_reference` loops over experts and masks the tokens routed to each;
`forward_grouped` sorts the (token, slot) pairs by expert so that each expert runs on one contiguous slice
(the layout grouped-GEMM kernels use), then scatters the results back with index_add_. The reference path is
chosen by the runtime option `moe_reference` (`self.runtime`, shared with the model).

The experts' three matrices are `ExpertLinear` modules (`gate_proj`, `up_proj`, `down_proj`), linear-like: both
paths call `proj(x, e)` for every expert e, so model surgery (`lmforge.model.surgery`) can replace them with a
LoRA adapter or a quantized kernel exactly as it replaces an `nn.Linear`. Each registers its (E, out, in)
parameter under the checkpoint's name (`w_gate`, `w_up`, `w_down`) and the MoE's state dict drops the module
level: `blocks.0.mlp.w_gate` as before, in the same order, so checkpoints, HF and GGUF names do not change.
`moe.w_gate` (and w_up, w_down) still read the weight; `named_parameters()` shows `mlp.gate_proj.w_gate`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.model.mlp import ACTIVATIONS, MLP, is_gated
from lmforge.model.runtime import RuntimeOptions


class ExpertLinear(nn.Module):
    """E bias-free linear maps of one shape in one (E, out, in) tensor:  forward(x, e) = x W_e^T.

    The experts' linear-like module: both MoE paths call it once per expert with that expert's tokens (n, in),
    so a replacement with the same `forward(x, e)` (a LoRA adapter, a quantized kernel, a recording wrapper)
    sees every expert's product. The parameter is registered under `param_name` (the checkpoint's name, see
    the module docstring) and read as `weight`."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, param_name: str) -> None:
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.param_name = param_name
        self.register_parameter(param_name, nn.Parameter(torch.empty(n_experts, out_features, in_features)))

    @property
    def weight(self) -> Tensor:
        return self._parameters[self.param_name]

    def forward(self, x: Tensor, e: int) -> Tensor:
        return F.linear(x, self.weight[e])

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}"


def _checkpoint_names(moe: MoE, state: dict[str, Tensor], prefix: str, _metadata: object) -> None:
    """State-dict post-hook: `gate_proj.w_gate` -> `w_gate` (up, down alike), placed first among the MoE's
    entries, where they stood when they were the MoE's own parameters (the MoE's entries are the last ones)."""
    ours = [k for k in state if k.startswith(prefix)]
    renamed = {prefix + name: state.pop(f"{prefix}{child}.{name}") for name, child in moe._fqn_modifiers().items()}
    rest = {k: state.pop(k) for k in ours if k in state}
    state.update(renamed)
    state.update(rest)


def _module_names(moe: MoE, state: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Load-state-dict pre-hook, the inverse of `_checkpoint_names`: `w_gate` -> `gate_proj.w_gate`."""
    for name, child in moe._fqn_modifiers().items():
        if prefix + name in state:
            state[f"{prefix}{child}.{name}"] = state.pop(prefix + name)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, runtime: RuntimeOptions | None = None) -> None:
        super().__init__()
        self.runtime = RuntimeOptions() if runtime is None else runtime  # shared with the model: moe_reference
        if cfg.moe is None:
            raise ConfigError("invalid moe=None: MoE needs a MoEConfig")
        if not is_gated(cfg.mlp):
            raise ConfigError(f"invalid mlp={cfg.mlp!r}: MoE experts need a gated kind (swiglu, geglu)")
        self.moe = m = cfg.moe
        E, d, h = m.n_experts, cfg.d_model, m.d_expert
        self.act = ACTIVATIONS[cfg.mlp]
        self.gate_proj = ExpertLinear(E, d, h, "w_gate")  # created first: parameters() keeps the init order
        self.up_proj = ExpertLinear(E, d, h, "w_up")
        self.down_proj = ExpertLinear(E, h, d, "w_down")
        self.router = nn.Linear(d, E, bias=False)
        self.score_bias: Tensor | None
        if m.score_correction_bias:
            self.register_buffer("score_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.score_bias = None
        self.shared = MLP(d, m.shared_size, cfg.mlp, bias=False) if m.shared_size > 0 else None
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None
        self.register_state_dict_post_hook(_checkpoint_names)
        self.register_load_state_dict_pre_hook(_module_names)

    w_gate = property(lambda self: self.gate_proj.weight, doc="(E, d_expert, d) gate weights of the experts")
    w_up = property(lambda self: self.up_proj.weight, doc="(E, d_expert, d) up weights of the experts")
    w_down = property(lambda self: self.down_proj.weight, doc="(E, d, d_expert) down weights of the experts")

    def _fqn_modifiers(self) -> dict[str, str]:
        """Checkpoint name -> child module, for each expert matrix whose module level the state dict drops.

        (The name is torch.distributed.checkpoint's hook for such renames: with it, its FQNs of the FSDP2
        state dict match `state_dict()`.) A child replaced by surgery keeps its own names."""
        children = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
        return {name: child for name, child in children if isinstance(self._modules[child], ExpertLinear)}

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x (n, d) -> (n, d)."""
        return self.down_proj(self.act(self.gate_proj(x, e)) * self.up_proj(x, e), e)

    def route(self, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (N, d) -> router logits (N, E) fp32, weights (N, k) fp32, expert ids (N, k)."""
        m = self.moe
        logits = F.linear(x2d.float(), self.router.weight.float())
        scores = logits.softmax(dim=-1) if m.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if m.topk_group < m.n_group:  # group-limited routing: keep the experts of the topk_group best groups
            groups = choice.view(-1, m.n_group, m.n_experts // m.n_group)
            if m.group_score == "max":
                group_scores = groups.max(dim=-1).values
            else:
                group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
            best = group_scores.topk(m.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        idx = choice.topk(m.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * m.routed_scaling_factor, idx

    def _losses(self, logits: Tensor, idx: Tensor) -> None:
        E = self.moe.n_experts
        f = torch.bincount(idx.flatten(), minlength=E).float() / idx.numel()  # fraction of assignments
        P = logits.softmax(dim=-1).mean(dim=0)  # mean router probability
        self.aux_loss = E * (f * P).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_reference(x) if self.runtime.moe_reference else self.forward_grouped(x)

    def _finish(self, x: Tensor, routed: Tensor) -> Tensor:
        out = routed.view_as(x)
        return out if self.shared is None else out + self.shared(x)

    def forward_reference(self, x: Tensor) -> Tensor:
        """Loop over experts; each runs on the tokens that chose it (x: (B, T, d))."""
        x2d = x.reshape(-1, x.shape[-1])
        logits, weights, idx = self.route(x2d)
        self._losses(logits, idx)
        out = torch.zeros_like(x2d)
        for e in range(self.moe.n_experts):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            y = self.expert(e, x2d[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return self._finish(x, out)

    def forward_grouped(self, x: Tensor) -> Tensor:
        """Sort the (token, slot) pairs by expert, run each expert on its contiguous slice, scatter back."""
        x2d = x.reshape(-1, x.shape[-1])
        logits, weights, idx = self.route(x2d)
        self._losses(logits, idx)
        flat = idx.flatten()  # pair p = token * k + slot
        order = flat.argsort(stable=True)
        token = order // self.moe.top_k
        counts = torch.bincount(flat, minlength=self.moe.n_experts).tolist()
        xs = x2d[token]  # (N k, d), grouped by expert
        ys = [self.expert(e, chunk) for e, chunk in enumerate(xs.split(counts)) if counts[e] > 0]
        y = torch.cat(ys) * weights.flatten()[order, None]
        out = torch.zeros_like(x2d).index_add_(0, token, y.to(x2d.dtype))
        return self._finish(x, out)
