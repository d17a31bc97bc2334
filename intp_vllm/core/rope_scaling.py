"""Training-free RoPE context extension: inv_freq and attention factor for each scaling type.

One function per type, selected from `ROPE_SCALING_FUNCTIONS` (as transformers'
`ROPE_INIT_FUNCTIONS`). All take the same keywords and return
`(inv_freq [rotary_dim // 2] float32, attention_factor)`, equal to transformers for the
same parameters. `rope_inv_freq` is the checked entry point.

- `none`: plain RoPE; factor ignored.
- `linear`: position interpolation, inv_freq / s.
- `ntk`: NTK-aware (the INTP paper): base' = base * s^(d / (d - 2)).
- `yarn`: NTK-by-parts with the attention factor 0.1 ln s + 1 (transformers with
  truncate=True and no mscale).
- `dynamic`: transformers' dynamic NTK at a sequence length:
  base' = base * (s * len / L - (s - 1))^(d / (d - 2)), len = max(seq_len, L). Without
  `seq_len` it is evaluated at len = s * L, the context the factor was chosen for. A
  per-request dynamic scale is `factor=1, seq_len=<request length>`, which equals `ntk`
  at s = request length / L.

Scale 1 is the original model exactly, for every type: at factor 1 (and, for `dynamic`,
no `seq_len` beyond L) inv_freq is bit for bit the unscaled one and the attention factor
is 1.0, so an 8-frame request runs the original model. transformers' YaRN at factor 1
also gives attention factor 1.0, but its inv_freq can differ from plain RoPE by one ulp
(it blends inv_freq / 1 with inv_freq); ours returns plain RoPE there, and
`hf_rope_parameters` maps every type at factor 1 to transformers' "default".

Note `dynamic` at factor s without `seq_len` is not `ntk` at s: transformers' formula at
s * L tokens gives base * (s^2 - s + 1)^(d / (d - 2)).
"""

from __future__ import annotations

import math

import torch

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def plain_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """Unscaled RoPE, base^(-2i / d), with transformers' operation order so results match bit for bit."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim))


def ntk_base(base: float, rotary_dim: int, factor: float) -> float:
    """The NTK-aware base of the INTP paper: base * s^(d / (d - 2))."""
    return base * factor ** (rotary_dim / (rotary_dim - 2))


def dynamic_ntk_base(base: float, rotary_dim: int, factor: float, original_max_position: int,
                     seq_len: float | None = None) -> float:
    """transformers' dynamic NTK base at `seq_len` tokens (default: factor * original_max_position)."""
    length = original_max_position * factor if seq_len is None else seq_len
    length = max(length, original_max_position)
    stretch = (factor * length / original_max_position) - (factor - 1)
    return base * stretch ** (rotary_dim / (rotary_dim - 2))


# Every type takes the same keywords (a uniform table signature), used or not.


def none_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
              beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, float]:
    """Plain RoPE whatever the factor: the model as trained."""
    return plain_inv_freq(base, rotary_dim), 1.0


def linear_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
                beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, float]:
    """Position interpolation: positions / s, done on inv_freq (the same product)."""
    return plain_inv_freq(base, rotary_dim) / factor, 1.0


def ntk_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
             beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: a larger base stretches low frequencies and keeps high ones."""
    return plain_inv_freq(ntk_base(base, rotary_dim, factor), rotary_dim), 1.0


def dynamic_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
                 beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW,
                 seq_len: float | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: NTK-aware with a base that grows with the sequence length (see module doc)."""
    return plain_inv_freq(dynamic_ntk_base(base, rotary_dim, factor, original_max_position, seq_len), rotary_dim), 1.0


def yarn_attention_factor(factor: float) -> float:
    """YaRN's softmax temperature correction, sqrt(1/t) = 0.1 ln s + 1 (1 when unscaled)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_correction_dim(rotations: float, rotary_dim: int, base: float, original_max_position: int) -> float:
    """The rotary dimension whose wavelength turns `rotations` times over the trained context."""
    return (rotary_dim * math.log(original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_ramp_bounds(*, base: float, rotary_dim: int, original_max_position: int,
                     beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[float, float]:
    """(low, high): the frequency indices where YaRN's ramp leaves 0 and reaches 1; independent of s."""
    low = max(math.floor(_yarn_correction_dim(beta_fast, rotary_dim, base, original_max_position)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, rotary_dim, base, original_max_position)), rotary_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    return float(low), float(high)


def yarn_interpolation_ramp(*, base: float, rotary_dim: int, original_max_position: int,
                            beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> torch.Tensor:
    """Per-frequency weight of interpolation (inv_freq / s) against extrapolation; independent of s."""
    low, high = yarn_ramp_bounds(base=base, rotary_dim=rotary_dim, original_max_position=original_max_position,
                                 beta_fast=beta_fast, beta_slow=beta_slow)
    return torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_rope(*, base: float, rotary_dim: int, factor: float, original_max_position: int,
              beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW) -> tuple[torch.Tensor, float]:
    """NTK-by-parts: high frequencies extrapolate, low frequencies interpolate, a linear ramp between."""
    if factor == 1:
        return plain_inv_freq(base, rotary_dim), 1.0  # the blend below is off by an ulp at s = 1
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
    "dynamic": dynamic_rope,
}
ROPE_TYPES = tuple(ROPE_SCALING_FUNCTIONS)
"""Every RoPE type, the one list (intp.rope_type, the CLI's --rope-type, the rotary modules)."""
PER_TOKEN_ROPE_TYPES = {"none": "none", "linear": "linear", "ntk": "ntk", "yarn": "yarn", "dynamic": "ntk"}
"""The type a per-token rotary computes for each RoPE type: dynamic NTK at a request's own
scale (intp factor "auto") is NTK at that scale."""


def _check_params(rope_type: str, rotary_dim: int, factor: float, original_max_position: int,
                  seq_len: float | None) -> None:
    if rope_type not in ROPE_SCALING_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not one of {', '.join(ROPE_SCALING_FUNCTIONS)}")
    if not factor >= 1:
        raise ValueError(f"RoPE factor must be >= 1, got {factor!r}")
    if rotary_dim < 4 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even number >= 4, got {rotary_dim!r}")
    if not original_max_position > 0:
        raise ValueError(f"original_max_position must be > 0, got {original_max_position!r}")
    if seq_len is not None and rope_type != "dynamic":
        raise ValueError(f"seq_len applies only to rope_type 'dynamic', got seq_len={seq_len!r} for {rope_type!r}")
    if seq_len is not None and not seq_len > 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len!r}")


def rope_inv_freq(rope_type: str, *, base: float, rotary_dim: int, factor: float, original_max_position: int,
                  beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW,
                  seq_len: float | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor) for `rope_type` at scale `factor` >= 1; `seq_len` only for dynamic."""
    _check_params(rope_type, rotary_dim, factor, original_max_position, seq_len)
    extra = {"seq_len": seq_len} if rope_type == "dynamic" else {}
    return ROPE_SCALING_FUNCTIONS[rope_type](
        base=base, rotary_dim=rotary_dim, factor=float(factor), original_max_position=original_max_position,
        beta_fast=beta_fast, beta_slow=beta_slow, **extra,
    )


def auto_factor(needed_tokens: int, trained_context: int) -> float:
    """The scale a request needs: max(1, tokens it needs / trained context)."""
    if not trained_context > 0:
        raise ValueError(f"trained_context must be > 0, got {trained_context!r}")
    return max(1.0, needed_tokens / trained_context)


def hf_rope_parameters(rope_type: str, *, base: float, rotary_dim: int, factor: float, original_max_position: int,
                       seq_len: float | None = None) -> dict:
    """transformers `rope_parameters` with which an HF Llama applies the same RoPE (parity references).

    NTK and dynamic become plain RoPE at their scaled base: transformers' own dynamic type
    changes its base as generation proceeds, ours is fixed for a request's life.
    """
    _check_params(rope_type, rotary_dim, factor, original_max_position, seq_len)
    if rope_type == "none" or (factor == 1 and rope_type != "dynamic"):
        return {"rope_type": "default", "rope_theta": base}
    if rope_type == "ntk":
        return {"rope_type": "default", "rope_theta": ntk_base(base, rotary_dim, factor)}
    if rope_type == "dynamic":
        return {"rope_type": "default",
                "rope_theta": dynamic_ntk_base(base, rotary_dim, factor, original_max_position, seq_len)}
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": base}
    return {"rope_type": "yarn", "factor": factor, "rope_theta": base,
            "original_max_position_embeddings": original_max_position}


CHECKPOINT_ROPE_TYPES = ("default", "linear")
"""A checkpoint's own `rope_parameters` types that INTP composes with (`CheckpointRope`)."""


class CheckpointRope:
    """A checkpoint's own RoPE (its `rope_parameters`) and how INTP's extension composes with it.

    A checkpoint may carry linear scaling c (LLaVA-NeXT-Video-7B-hf: c = 2 over Vicuna's
    L = 4096): it was trained with positions p / c, so its trained length is c * L tokens. The
    one rule: **the checkpoint's linear factor divides every INTP frequency, and INTP's scale
    is measured against c * L**:

        inv_freq(s) = INTP_type(s; base, rotary_dim, original_max_position=L) / c
        attention(s) = INTP_type's attention factor at s
        s = max(1, tokens / (c * L))

    So up to c * L tokens (s = 1) the rotary is exactly the checkpoint's (plain inv_freq / c,
    as transformers' linear type computes it); past it, INTP extends the checkpoint's scaled
    positions p / c (which run to s * L) as it extends a plain model's positions. Linear INTP
    gives linear at s * c; NTK gives the checkpoint's linear c at base * s^(d / (d - 2)); YaRN's
    ramp, which depends on each frequency's turns over the trained length, is the same as for
    plain RoPE at L (c * L positions at frequencies / c turn as often as L at the plain ones).
    c = 1 (rope type "default") is INTP as before.

    Raises ValueError for other checkpoint rope types (yarn, llama3, ...) or a linear factor < 1.
    """

    def __init__(self, rope_parameters: dict, max_position_embeddings: int):
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type not in CHECKPOINT_ROPE_TYPES:
            raise ValueError(
                f"the checkpoint's text_config.rope_parameters has rope_type {rope_type!r}; intp_vllm composes its "
                f"extension with {' or '.join(repr(t) for t in CHECKPOINT_ROPE_TYPES)} only: set the scaling with "
                "intp.rope_type instead")
        self.base = float(rope_parameters["rope_theta"])
        self.linear_factor = float(rope_parameters["factor"]) if rope_type == "linear" else 1.0
        if not self.linear_factor >= 1:
            raise ValueError(f"the checkpoint's linear RoPE factor must be >= 1, got {self.linear_factor!r}")
        self.max_position_embeddings = int(max_position_embeddings)

    @classmethod
    def from_text_config(cls, text_config) -> "CheckpointRope":
        """From an HF text config (`rope_parameters`, `max_position_embeddings`)."""
        return cls(text_config.rope_parameters, text_config.max_position_embeddings)

    @property
    def trained_context(self) -> int:
        """Tokens the checkpoint was trained to: c * L (INTP's scale is measured against it)."""
        return int(self.max_position_embeddings * self.linear_factor)

    def inv_freq(self, rope_type: str, *, rotary_dim: int, factor: float, beta_fast: float = YARN_BETA_FAST,
                 beta_slow: float = YARN_BETA_SLOW, seq_len: float | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention_factor) of INTP's `rope_type` at scale `factor` composed with the
        checkpoint's (the class's rule); at factor 1 the checkpoint's own rotary exactly."""
        inv_freq, attention = rope_inv_freq(rope_type, base=self.base, rotary_dim=rotary_dim, factor=factor,
                                            original_max_position=self.max_position_embeddings,
                                            beta_fast=beta_fast, beta_slow=beta_slow, seq_len=seq_len)
        return (inv_freq if self.linear_factor == 1 else inv_freq / self.linear_factor), attention

    def hf_rope_parameters(self, rope_type: str, *, rotary_dim: int, factor: float) -> dict:
        """transformers `rope_parameters` applying the composed RoPE (parity references).

        Raises ValueError where transformers cannot express it (YaRN past a linear checkpoint).
        """
        plain = hf_rope_parameters(rope_type, base=self.base, rotary_dim=rotary_dim, factor=factor,
                                   original_max_position=self.max_position_embeddings)
        if self.linear_factor == 1:
            return plain
        if plain["rope_type"] == "default":
            return {"rope_type": "linear", "factor": self.linear_factor, "rope_theta": plain["rope_theta"]}
        if plain["rope_type"] == "linear":
            return {"rope_type": "linear", "factor": plain["factor"] * self.linear_factor, "rope_theta": self.base}
        raise ValueError(f"transformers has no rope type for {rope_type} over a linear "
                         f"x{self.linear_factor:g} checkpoint")
