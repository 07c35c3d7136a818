"""Model Stock (Jang et al. 2024, arXiv:2403.19522): average N fine-tuned models, then pull the average back
towards the base by how much the fine-tuning directions agree.

With offsets d_i = theta_i - theta_0 from the base theta_0 and cos = the mean pairwise cosine of the d_i
(over the whole tensor, or per output row with `filter_wise`):

    t = N cos / (1 + (N - 1) cos)
    merged = t * mean_i(theta_i) + (1 - t) * theta_0

Where 1 + (N - 1) cos vanishes (|.| < 1e-6) there is no finite estimate and the base is kept (t = 0). Needs a
base and at least two fine-tuned models. Arithmetic in the inputs' dtype, as mergekit's `model_stock`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def model_stock(base: Tensor, tensors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Merge the fine-tuned `tensors` (at least two) around `base`; same shape as `base`."""
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if base.dim() == 1 else w for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)
