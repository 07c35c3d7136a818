"""Position information: rotary embeddings (with context-extension scalings),
learned and sinusoidal absolute embeddings, and ALiBi biases.

RoPE (Su et al., 2021) rotates each pair of q/k channels by an angle that grows
with the position p:  (x1, x2) -> (x1 cos(p θ_i) - x2 sin(p θ_i), x2 cos(p θ_i) + x1 sin(p θ_i)),
θ_i = base^(-2i/d) for i < d/2, d the rotary dimension. q·k then depends only on
the relative offset. Two layouts pair the channels differently:
  "half"        channel i with channel i + d/2   (Hugging Face Llama, Mistral, Qwen, Gemma)
  "interleaved" channel 2i with channel 2i + 1   (GPT-J, Meta's original Llama, DeepSeek MLA)
Partial rotary rotates only the first `rotary_dim` channels of each head.

Scalings change θ_i to reach beyond the training context L:
  linear   θ_i / s                                           (position interpolation)
  dynamic  base' = base · (s·n/L - (s-1))^(d/(d-2)) once n > L (dynamic NTK)
  llama3   low frequencies (wavelength > L/low) divided by s, high ones (< L/high) kept,
           a smooth blend in between
  yarn     per-frequency blend of interpolated and original θ by a linear ramp between
           the dims that make beta_fast and beta_slow turns over L, and cos/sin scaled by
           an attention factor 0.1·ln(s)+1 (or mscale/mscale_all_dim ratio, DeepSeek)

Absolute positions:  sinusoidal PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...);
learned: a trained table (GPT-2).
ALiBi (Press et al., 2021): no embedding; attention logits get  -m_h · (i - j)
with head slopes m_h = 2^(-8h/n) (n a power of two; otherwise interleaved from 2n).
"""

from __future__ import annotations

import functools
import math

import torch

from lmforge.config import ModelConfig, RopeScaling


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: torch.Tensor, s: RopeScaling, dim: int, base: float) -> tuple[torch.Tensor, float]:
    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention = _yarn_mscale(s.factor)
    orig = s.original_max_seq_len

    def correction_dim(turns: float) -> float:
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep, attention


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    orig = s.original_max_seq_len
    low_wavelen, high_wavelen = orig / s.low_freq_factor, orig / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


@functools.lru_cache(maxsize=64)
def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_i (float32, shape rotary_dim/2) and the cos/sin scale.

    `seq_len` (the longest position + 1 in use) only matters for dynamic NTK. Cached: configs are
    immutable, and callers must not modify the returned tensor.
    """
    dim, base, s = cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling
    if s is not None and s.kind == "dynamic":
        orig = s.original_max_seq_len or cfg.max_seq_len
        n = max(seq_len or orig, orig)
        base = base * ((s.factor * n / orig) - (s.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if s is None or s.kind == "dynamic":
        return inv_freq, 1.0
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0
    if s.kind == "llama3":
        return _llama3(inv_freq, s), 1.0
    return _yarn(inv_freq, s, dim, base)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p·θ_i for positions (B, T): each (B, 1, T, rotary_dim/2), float32."""
    dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic"
    seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else None  # a host sync: only when needed
    # torch.compile traces the computation (constant-folded into the graph) rather than the eager cache
    frequencies = rope_frequencies.__wrapped__ if torch.compiler.is_compiling() else rope_frequencies
    inv_freq, scale = frequencies(cfg, seq_len)
    angles = positions.float()[:, None, :, None] * inv_freq.to(positions.device)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate the first 2·cos.shape[-1] channels of x (B, H, T, D); the rest pass through."""
    rot = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    xr, rest = x[..., :rot], x[..., rot:]
    if layout == "half":
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed sinusoidal table of Vaswani et al. at `positions` (B, T) -> (B, T, dim)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes m_h (float32, shape n_heads)."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive ALiBi bias -m_h·(i - j) for query and key positions (Tq,) or (B, Tq) and (Tk,) or (B, Tk):
    shape (B or 1, H, Tq, Tk)."""
    distance = (q_pos[..., :, None] - k_pos[..., None, :]).float()
    if distance.dim() == 2:
        distance = distance[None]
    return -(alibi_slopes(n_heads).to(q_pos.device)[:, None, None] * distance[:, None])
