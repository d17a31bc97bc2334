"""Rotary embedding with a per-token RoPE scale, in torch: the CPU path and the kernel's reference.

cos/sin are computed on the fly from (position, scale) instead of a table per scale.
For every type the scaled inv_freq is the plain one times a factor that depends only on
s and the frequency index, so one pass covers a batch that mixes scales:

- linear: 1 / s
- ntk:    s ** (-2i / (d - 2))     (base' = base * s ** (d / (d - 2)))
- yarn:   ramp_i / s + (1 - ramp_i), times the attention factor 0.1 ln s + 1 on cos/sin

At s = 1 every factor is exactly 1, so the result equals the unscaled rotary embedding.
"""

from __future__ import annotations

import torch

from .rope_scaling import YARN_BETA_FAST, YARN_BETA_SLOW, plain_inv_freq, yarn_interpolation_ramp

ROTARY_TYPES = ("none", "linear", "ntk", "yarn")


def scaled_cos_sin(positions: torch.Tensor, scales: torch.Tensor, *, rotary_dim: int, rope_type: str, base: float,
                   original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                   beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [T, rotary_dim // 2] for each token's position and scale."""
    if rope_type not in ROTARY_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROTARY_TYPES)}")
    device = positions.device
    inv_freq = plain_inv_freq(base, rotary_dim).to(device)[None, :]
    scales = scales.to(torch.float32)[:, None]
    if rope_type == "linear":
        inv_freq = inv_freq / scales
    elif rope_type == "ntk":
        index = torch.arange(rotary_dim // 2, device=device, dtype=torch.float32)[None, :]
        inv_freq = inv_freq * torch.pow(scales, -2.0 * index / (rotary_dim - 2))
    elif rope_type == "yarn":
        ramp = yarn_interpolation_ramp(base=base, rotary_dim=rotary_dim, original_max_position=original_max_position,
                                       beta_fast=beta_fast, beta_slow=beta_slow).to(device)[None, :]
        inv_freq = (inv_freq / scales) * ramp + inv_freq * (1 - ramp)
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    if rope_type == "yarn":
        attention = torch.where(scales > 1, 0.1 * torch.log(scales) + 1.0, torch.ones_like(scales))
        cos, sin = cos * attention, sin * attention
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, rotary_dim: int,
            is_neox: bool) -> torch.Tensor:
    """x [T, heads * head_size]; cos/sin [T, rotary_dim // 2] fp32 -> rotated x, same dtype."""
    shaped = x.view(x.shape[0], -1, head_size)
    rot = shaped[..., :rotary_dim].to(torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = torch.cat((rotated.to(x.dtype), shaped[..., rotary_dim:]), dim=-1)
    return out.view_as(x)


def apply_scaled_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                        scales: torch.Tensor, *, head_size: int, rotary_dim: int, is_neox: bool, rope_type: str,
                        base: float, original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                        beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query [T, Hq * head_size] and key [T, Hk * head_size] at per-token scales [T]."""
    cos, sin = scaled_cos_sin(positions, scales, rotary_dim=rotary_dim, rope_type=rope_type, base=base,
                              original_max_position=original_max_position, beta_fast=beta_fast, beta_slow=beta_slow)
    query = _rotate(query, cos, sin, head_size, rotary_dim, is_neox)
    if key is not None:
        key = _rotate(key, cos, sin, head_size, rotary_dim, is_neox)
    return query, key
