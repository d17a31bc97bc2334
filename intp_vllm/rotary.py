"""Rotary embedding with a per-token RoPE scale, in torch: the CPU path and the kernel's reference.

cos/sin are computed on the fly from each token's position and inv_freq, and inv_freq
comes from the token's scale — no cos/sin table per scale. The inv_freq of a scale is
`rope_scaling.rope_inv_freq`'s, so a token at scale s gets exactly the numbers a model
built for s alone would use (and s = 1 is the original model bit for bit). inv_freq is
computed once per distinct scale in the batch and gathered per token.

Layouts follow vLLM's `RotaryEmbedding.forward_static`: query/key are [T, heads * head_size],
the first `rotary_dim` dims of each head rotate (the rest pass through), NeoX style rotates
the two halves, GPT-J style rotates interleaved pairs. The rotation is done in fp32 and
written back in the input dtype.

- `apply_scaled_rotary`: functional (inputs untouched), the reference.
- `apply_scaled_rotary_`: in place (the CPU serving path), same numbers.
- `rotate_with_inv_freq`: per-token inv_freq/attention factor given (vLLM module path).
"""

from __future__ import annotations

import torch

from .rope_scaling import YARN_BETA_FAST, YARN_BETA_SLOW, rope_inv_freq

ROTARY_TYPES = ("none", "linear", "ntk", "yarn")
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


def scaled_cos_sin(positions: torch.Tensor, scales: torch.Tensor, *, rotary_dim: int, rope_type: str, base: float,
                   original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                   beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [T, rotary_dim // 2] (times the attention factor) for each token's position and scale.

    inv_freq is computed once per distinct scale; a batch at one scale skips the gather.
    """
    if rope_type not in ROTARY_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROTARY_TYPES)}")
    if scales.ndim != 1 or scales.shape[0] != positions.shape[0] or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be a 1-D float tensor of length T={positions.shape[0]}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    device = positions.device
    lo, hi = torch.aminmax(scales.detach().to(torch.float32)) if scales.numel() else (None, None)
    if lo is None or lo.item() == hi.item():
        scale = 1.0 if lo is None else float(lo.item())
        inv_freq, attention = inv_freq_per_scale([scale], rope_type=rope_type, base=base, rotary_dim=rotary_dim,
                                                 original_max_position=original_max_position,
                                                 beta_fast=beta_fast, beta_slow=beta_slow)
        freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device)  # [T, d/2], broadcast
        cos, sin = freqs.cos(), freqs.sin()
        if attention.item() != 1.0:
            factor = float(attention.item())
            cos.mul_(factor)
            sin.mul_(factor)
        return cos, sin
    unique, which = torch.unique(scales.detach().to(torch.float32), return_inverse=True)
    inv_freq, attention = inv_freq_per_scale(unique.cpu().tolist(), rope_type=rope_type, base=base,
                                             rotary_dim=rotary_dim, original_max_position=original_max_position,
                                             beta_fast=beta_fast, beta_slow=beta_slow)
    which = which.to(device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device)[which]
    cos, sin = freqs.cos(), freqs.sin()
    if bool((attention != 1.0).any()):
        factor = attention.to(device)[which][:, None]
        cos.mul_(factor)
        sin.mul_(factor)
    return cos, sin


def _complex_ok(x: torch.Tensor) -> bool:
    """Whether pairs of x's last dim can be viewed as complex numbers (even offset and strides)."""
    return x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, head_size: int, rotary_dim: int,
            is_neox: bool) -> torch.Tensor:
    """Rotate x [T, heads * head_size] in place with fp32 cos/sin [T, rotary_dim // 2]; returns x.

    The last dim of x must be contiguous (row stride free, so views of a fused qkv work).
    """
    if x.shape[0] == 0:
        return x
    if x.stride(-1) != 1:
        raise ValueError("the last dimension of query/key must be contiguous (stride 1)")
    tokens = x.shape[0]
    shaped = x.view(tokens, -1, head_size)  # view needs only stride(-1) == 1 and head_size | row
    half = rotary_dim // 2
    cos, sin = cos[:, None, :], sin[:, None, :]
    if x.dtype == torch.float32:
        if is_neox:
            x1, x2 = shaped[..., :half], shaped[..., half:rotary_dim]
            o1 = x1 * cos
            o1.addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
            x2.mul_(cos).addcmul_(x1, sin)  # x2 cos + x1 sin (x1 still the input)
            x1.copy_(o1)
        elif _complex_ok(shaped):  # interleaved pairs (x0, x1) -> a complex number, one multiply in place
            torch.view_as_complex(shaped[..., :rotary_dim].unflatten(-1, (half, 2))).mul_(torch.complex(cos, sin))
        else:
            rot = shaped[..., :rotary_dim]
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            o1 = x1 * cos
            o1.addcmul_(x2, sin, value=-1.0)
            x2.mul_(cos).addcmul_(x1, sin)
            x1.copy_(o1)
        return x
    rot = shaped[..., :rotary_dim].to(torch.float32)
    if is_neox:
        x1, x2 = rot[..., :half], rot[..., half:]
        o1 = x1 * cos
        o1.addcmul_(x2, sin, value=-1.0)
        x2.mul_(cos).addcmul_(x1, sin)
        x1.copy_(o1)
    else:
        torch.view_as_complex(rot.unflatten(-1, (half, 2))).mul_(torch.complex(cos, sin))
    shaped[..., :rotary_dim].copy_(rot)
    return x


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


def rotate_with_inv_freq(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                         inv_freq: torch.Tensor, attention: torch.Tensor, *, head_size: int, rotary_dim: int,
                         is_neox: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query [T, Hq * head_size] and key [T, Hk * head_size] with per-token inv_freq [T, d/2]
    and attention factor [T]; positions int [T]. Out of place, tensor ops only (traceable)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    attention = attention[:, None]
    cos, sin = freqs.cos() * attention, freqs.sin() * attention
    query = _rotate(query, cos, sin, head_size, rotary_dim, is_neox)
    if key is not None:
        key = _rotate(key, cos, sin, head_size, rotary_dim, is_neox)
    return query, key


def apply_scaled_rotary_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                         scales: torch.Tensor, *, head_size: int, rotary_dim: int, is_neox: bool, rope_type: str,
                         base: float, original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                         beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query and key IN PLACE at per-token scales [T] (floats >= 1); returns (query, key)."""
    _check(positions, query, key, head_size, rotary_dim)
    cos, sin = scaled_cos_sin(positions, scales, rotary_dim=rotary_dim, rope_type=rope_type, base=base,
                              original_max_position=original_max_position, beta_fast=beta_fast, beta_slow=beta_slow)
    rotate_(query, cos, sin, head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    if key is not None:
        rotate_(key, cos, sin, head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox)
    return query, key


def apply_scaled_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None,
                        scales: torch.Tensor, *, head_size: int, rotary_dim: int, is_neox: bool, rope_type: str,
                        base: float, original_max_position: int, beta_fast: float = YARN_BETA_FAST,
                        beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query and key at per-token scales [T] (floats >= 1); new tensors, inputs untouched."""
    _check(positions, query, key, head_size, rotary_dim)
    cos, sin = scaled_cos_sin(positions, scales, rotary_dim=rotary_dim, rope_type=rope_type, base=base,
                              original_max_position=original_max_position, beta_fast=beta_fast, beta_slow=beta_slow)
    query = _rotate(query, cos, sin, head_size, rotary_dim, is_neox)
    if key is not None:
        key = _rotate(key, cos, sin, head_size, rotary_dim, is_neox)
    return query, key
