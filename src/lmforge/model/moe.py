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
(the layout grouped-GEMM kernels use), then scatters the results back with index_add_.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.model.mlp import ACTIVATIONS, MLP, is_gated


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError("invalid moe=None: MoE needs a MoEConfig")
        if not is_gated(cfg.mlp):
            raise ConfigError(f"invalid mlp={cfg.mlp!r}: MoE experts need a gated kind (swiglu, geglu)")
        self.moe = m = cfg.moe
        E, d, h = m.n_experts, cfg.d_model, m.d_expert
        self.act = ACTIVATIONS[cfg.mlp]
        self.router = nn.Linear(d, E, bias=False)
        self.score_bias: Tensor | None
        if m.score_correction_bias:
            self.register_buffer("score_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.score_bias = None
        self.w_gate = nn.Parameter(torch.empty(E, h, d))
        self.w_up = nn.Parameter(torch.empty(E, h, d))
        self.w_down = nn.Parameter(torch.empty(E, d, h))
        self.shared = MLP(d, m.shared_size, cfg.mlp, bias=False) if m.shared_size > 0 else None
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)
        self.use_reference = False
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x (n, d) -> (n, d)."""
        return F.linear(self.act(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e]), self.w_down[e])

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
        return self.forward_reference(x) if self.use_reference else self.forward_grouped(x)

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
