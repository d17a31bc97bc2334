"""Rotary embedding with a per-token RoPE scale, in torch: the CPU serving path and the reference.

cos/sin are computed on the fly from each token's position and inv_freq, and inv_freq
comes from the token's scale: no cos/sin table per scale. The inv_freq of a scale is
`rope_scaling.rope_inv_freq`'s, so a token at scale s gets exactly the numbers a model
built for s alone would use (and s = 1 is the original model bit for bit).

Layouts follow vLLM's `RotaryEmbedding.forward_static`: query/key are [T, heads * head_size],
the first `rotary_dim` dims of each head rotate (the rest pass through), NeoX style rotates
the two halves, GPT-J style rotates interleaved pairs. The rotation is done in fp32 and
written back in the input dtype.

- `cos_sin_rows`: cos/sin rows in vLLM's cache layout, for a table over positions (one scale)
  or one row per token (its own scale); every cos/sin in the project comes from here.
- `rotate_with_inv_freq`: per-token inv_freq and attention factor given; tensor ops only.
- `apply_scaled_rotary`: per-token scales given; the reference that both serving paths of
  `llm_rope.PerRequestRotaryEmbedding` are tested against (the Triton kernel
  `intp_vllm_kernels.scaled_rotary` on GPU, vLLM's rotary op over per-token cos/sin rows on CPU).
"""

from __future__ import annotations

import torch

from intp_vllm.core.rope_scaling import PER_TOKEN_ROPE_TYPES, YARN_BETA_FAST, YARN_BETA_SLOW, rope_inv_freq

ROTARY_TYPES = tuple(dict.fromkeys(PER_TOKEN_ROPE_TYPES.values()))
"""The types a per-token scale is computed for (`dynamic` is `ntk` at the token's scale)."""
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def inv_freq_per_scale(scales: list[float], *, rope_type: str, base: float, rotary_dim: int,
                       original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                       beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv_freq [S, rotary_dim // 2] fp32, attention factor [S] fp32) for each scale in `scales`."""
    if rope_type not in ROTARY_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROTARY_TYPES)}")
    rows = [rope_inv_freq(rope_type, base=base, rotary_dim=rotary_dim, factor=float(s),
                          original_max_position=original_max_position, beta_fast=beta_fast, beta_slow=beta_slow)
            for s in scales]
    return torch.stack([inv for inv, _ in rows]), torch.tensor([att for _, att in rows], dtype=torch.float32)


def _check(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None, head_size: int,
           rotary_dim: int) -> None:
    if positions.ndim != 1 or positions.dtype.is_floating_point or positions.dtype.is_complex:
        raise TypeError(f"positions must be a 1-D integer tensor [T], got {positions.dtype} {tuple(positions.shape)}")
    if not (0 < rotary_dim <= head_size and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], got {rotary_dim}")
    for name, x in (("query", query), ("key", key)):
        if x is None:
            continue
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} dtype must be one of float32/float16/bfloat16, got {x.dtype}")
        if x.ndim != 2 or x.shape[0] != positions.shape[0] or x.shape[1] % head_size:
            raise ValueError(f"{name} must be [T={positions.shape[0]}, heads * {head_size}], got {tuple(x.shape)}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, rotary_dim: int,
            is_neox: bool) -> torch.Tensor:
    """Out-of-place rotation (x untouched): the straightforward formula, as vLLM's forward_static."""
    shaped = x.reshape(x.shape[0], -1, head_size)
    rot = shaped[..., :rotary_dim].to(torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = torch.cat((rotated.to(x.dtype), shaped[..., rotary_dim:]), dim=-1)
    return out.view(x.shape)


def cos_sin_rows(positions: torch.Tensor, inv_freq: torch.Tensor, attention) -> torch.Tensor:
    """[T, rotary_dim] fp32: cos then sin of each position's angles, times the attention factor;
    the layout of vLLM's cos/sin cache. inv_freq is [d/2] (one scale) or [T, d/2] (each token's
    own); attention a number or [T, 1]."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention


def rotate_with_inv_freq(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                         inv_freq: torch.Tensor, attention: torch.Tensor, *, head_size: int, rotary_dim: int,
                         is_neox: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query [T, Hq * head_size] and key [T, Hk * head_size] with per-token inv_freq [T, d/2]
    and attention factor [T]; positions int [T]. Out of place, tensor ops only (traceable)."""
    cos, sin = cos_sin_rows(positions, inv_freq, attention[:, None]).chunk(2, dim=-1)
    query = _rotate(query, cos, sin, head_size, rotary_dim, is_neox)
    if key is not None:
        key = _rotate(key, cos, sin, head_size, rotary_dim, is_neox)
    return query, key


def apply_scaled_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                        scales: torch.Tensor, *, head_size: int, rotary_dim: int, is_neox: bool, rope_type: str,
                        base: float, original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                        beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query and key at per-token scales [T] (floats >= 1); new tensors, inputs untouched.

    inv_freq is built once per distinct scale and gathered per token: the reference that the
    Triton kernel and the serving path are tested against.
    """
    _check(positions, query, key, head_size, rotary_dim)
    if scales.ndim != 1 or scales.shape[0] != positions.shape[0] or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be a 1-D float tensor of length T={positions.shape[0]}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if positions.shape[0] == 0:
        return query.clone(), None if key is None else key.clone()
    distinct, which = torch.unique(scales.detach().cpu().to(torch.float32), return_inverse=True)
    inv_freq, attention = inv_freq_per_scale(distinct.tolist(), rope_type=rope_type, base=base, rotary_dim=rotary_dim,
                                             original_max_position=original_max_position, beta_fast=beta_fast,
                                             beta_slow=beta_slow)
    which = which.to(positions.device)
    return rotate_with_inv_freq(positions, query, key, inv_freq.to(positions.device)[which],
                                attention.to(positions.device)[which], head_size=head_size, rotary_dim=rotary_dim,
                                is_neox=is_neox)
