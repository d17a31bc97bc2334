"""Per-request RoPE scale, carried inside the position ids.

vLLM gives a model no per-request data at forward time, but it does let an M-RoPE model
choose each request's positions once, at prefill (`get_mrope_input_positions`), and
then continues them through decode as `delta + context_len`. So a request's scale is
written into the high bits of its positions: position = code << POSITION_BITS | pos.
The rotary embedding splits them again. Everything stays below 2**31, because vLLM's
GPU model runner V2 keeps prefill positions in int32.

The code is a log-quantised scale, s = 2 ** (code / CODES_PER_OCTAVE), rounded up so a
request always gets at least the scale it needs; code 0 is s = 1 exactly (the original
model). The model's processor decides a request's code once, from its expanded prompt,
and hands it to the worker with the video's data; the cache salt comes from the same value
(`vllm_ext/model.py`: `IntpMultiModalProcessor.apply`, `IntpVideoModel.get_mrope_input_positions`).
"""

from __future__ import annotations

import math

import torch

from intp_vllm.core.rope_scaling import auto_factor

POSITION_BITS = 20
MAX_POSITION = 1 << POSITION_BITS
CODE_BITS = 11
CODES_PER_OCTAVE = 256
MAX_SCALE = 2 ** (((1 << CODE_BITS) - 1) / CODES_PER_OCTAVE)


def scale_code(scale: float) -> int:
    """Smallest code whose scale is >= `scale` (>= 1)."""
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"a request's RoPE scale must be within [1, {MAX_SCALE:.1f}], got {scale:.3f}")
    code = math.ceil(math.log2(scale) * CODES_PER_OCTAVE - 1e-9)
    return max(code, 0)


def code_scale(code: int) -> float:
    """The scale s = 2 ** (code / CODES_PER_OCTAVE) a code stands for."""
    return 2.0 ** (code / CODES_PER_OCTAVE)


def request_scale_code(prompt_tokens: int, trained_context: int) -> int:
    """The code of the scale a request with this prompt needs: max(1, prompt tokens / L).

    The prompt alone decides, so a request as long as the model was trained on (an 8-frame
    video and its question) runs at s = 1; the answer then runs a little past L * s, as it
    did in training.
    """
    if prompt_tokens >= MAX_POSITION:
        raise ValueError(f"a prompt of {prompt_tokens} tokens exceeds the {MAX_POSITION}-position limit")
    return scale_code(auto_factor(prompt_tokens, trained_context))


SCALE_SALT = "intp-rope-scale-{code}"


def scale_cache_salt(code: int) -> str | None:
    """The prefix-cache salt of a request at `code` that has no salt of its own; None at s = 1,
    so unscaled requests share blocks with text-only ones."""
    return SCALE_SALT.format(code=code) if code else None


def join_cache_salts(client_salt: str | None, scale_salt: str | None) -> str | None:
    """The salt a request runs with: the client's own salt (or None) joined to its scale's
    (`scale_cache_salt`, None at s = 1).

    A client's salt always gets "+intp-rope-scale-<code>", code 0 included. So a salt either
    has no "+" and is the scale's alone, or names its request's scale after its last "+":
    two requests share prefix-cache blocks only at the same scale, whatever salts clients
    pick (a text-only request with the salt "intp-rope-scale-5" cannot seed a scaled one).
    """
    if client_salt is None:
        return scale_salt
    return f"{client_salt}+{scale_salt or SCALE_SALT.format(code=0)}"


def encode_positions(num_tokens: int, code: int) -> torch.Tensor:
    """Prompt positions 0..n-1 of a request at `code`, as int64."""
    return torch.arange(num_tokens, dtype=torch.int64) + (code << POSITION_BITS)


def position_offset(code: int) -> int:
    """The M-RoPE delta that keeps decode positions at the same scale."""
    return code << POSITION_BITS


def decode_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded positions -> (plain positions, scale codes), both int64; tensor ops only."""
    return positions & (MAX_POSITION - 1), positions >> POSITION_BITS


def all_code_scales() -> list[float]:
    """The scale of every code, in code order."""
    return [code_scale(code) for code in range(1 << CODE_BITS)]
