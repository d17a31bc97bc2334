"""Training-free RoPE context extension: inv_freq and attention factor for each scaling type.

One function per type, selected from `ROPE_SCALING_FUNCTIONS` (as transformers'
`ROPE_INIT_FUNCTIONS`). Each returns `(inv_freq [rotary_dim // 2] float32, attention_factor)`
and equals transformers for the same parameters; at factor 1 every type is plain RoPE
exactly, so an 8-frame request runs the original model.

- `none`: plain RoPE, factor ignored.
- `linear`: position interpolation, positions / s.
- `ntk`: NTK-aware (the INTP paper): base' = base * s^(d / (d - 2)).
- `yarn`: NTK-by-parts with the attention factor 0.1 ln s + 1.
- `dynamic`: NTK-aware with s taken from each request's own length (transformers'
  dynamic NTK at factor 1), so its factor is always derived, never set.
"""

from __future__ import annotations

import math

import torch

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def plain_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """Unscaled RoPE: base ** (-2i / d), computed as transformers does."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dim
    return 1.0 / (base**exponents)


def ntk_base(base: float, rotary_dim: int, factor: float) -> float:
    """The NTK-aware base: base * s^(d / (d - 2))."""
    return base * factor ** (rotary_dim / (rotary_dim - 2))


def none_rope(*, base: float, rotary_dim: int, **_) -> tuple[torch.Tensor, float]:
    return plain_inv_freq(base, rotary_dim), 1.0


def linear_rope(*, base: float, rotary_dim: int, factor: float, **_) -> tuple[torch.Tensor, float]:
    return plain_inv_freq(base, rotary_dim) / factor, 1.0


def ntk_rope(*, base: float, rotary_dim: int, factor: float, **_) -> tuple[torch.Tensor, float]:
    return plain_inv_freq(ntk_base(base, rotary_dim, factor), rotary_dim), 1.0


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_correction_dim(rotations: float, rotary_dim: int, base: float, original_max_position: int) -> float:
    return (rotary_dim * math.log(original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_interpolation_ramp(*, base: float, rotary_dim: int, original_max_position: int,
                            beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> torch.Tensor:
    """Per-frequency weight of interpolation (inv_freq / s) against extrapolation; independent of s."""
    low = max(math.floor(_yarn_correction_dim(beta_fast, rotary_dim, base, original_max_position)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, rotary_dim, base, original_max_position)), rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
              beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW, **_) -> tuple[torch.Tensor, float]:
    """NTK-by-parts: high frequencies extrapolate, low frequencies interpolate, a linear ramp between."""
    ramp = yarn_interpolation_ramp(base=base, rotary_dim=rotary_dim, original_max_position=original_max_position,
                                   beta_fast=beta_fast, beta_slow=beta_slow)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim)
    extrapolation = 1 - ramp
    # transformers' order of operations, so that the result matches it bit for bit
    blended = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return blended, yarn_attention_factor(factor)


ROPE_SCALING_FUNCTIONS = {
    "none": none_rope,
    "linear": linear_rope,
    "ntk": ntk_rope,
    "yarn": yarn_rope,
    "dynamic": ntk_rope,
}


def rope_inv_freq(rope_type: str, *, base: float, rotary_dim: int, factor: float, original_max_position: int,
                  beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor) for `rope_type` at scale `factor` >= 1."""
    if rope_type not in ROPE_SCALING_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROPE_SCALING_FUNCTIONS)}")
    if not factor >= 1:
        raise ValueError(f"RoPE factor must be >= 1, got {factor!r}")
    if rotary_dim < 4 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even number >= 4, got {rotary_dim!r}")
    if factor == 1:
        return plain_inv_freq(base, rotary_dim), 1.0  # scale 1 is the original model, bit for bit
    return ROPE_SCALING_FUNCTIONS[rope_type](
        base=base, rotary_dim=rotary_dim, factor=float(factor), original_max_position=original_max_position,
        beta_fast=beta_fast, beta_slow=beta_slow,
    )


def auto_factor(needed_tokens: int, trained_context: int) -> float:
    """The scale a request needs: max(1, tokens it needs / trained context)."""
    return max(1.0, needed_tokens / trained_context)


def hf_rope_parameters(rope_type: str, *, base: float, rotary_dim: int, factor: float,
                       original_max_position: int) -> dict:
    """transformers `rope_parameters` that make an HF Llama apply the same RoPE (parity references)."""
    if rope_type in ("ntk", "dynamic"):
        return {"rope_type": "default", "rope_theta": ntk_base(base, rotary_dim, factor)}
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": base}
    if rope_type == "yarn":
        return {"rope_type": "yarn", "factor": factor, "rope_theta": base,
                "original_max_position_embeddings": original_max_position}
    if rope_type == "none":
        return {"rope_type": "default", "rope_theta": base}
    raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROPE_SCALING_FUNCTIONS)}")
