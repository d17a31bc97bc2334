"""Put the INTP-scaled rotary embedding into vLLM's Llama.

vLLM's own `ntk`/`dynamic` ropes keep a cos/sin table of the trained length while
allowing a longer max_model_len (IndexError past it), and a custom `rope_type` is
rejected by `get_rope`. So the checkpoint's `rope_parameters` stay untouched and the
model swaps its Llama's rotary module after building it: one shared module whose
table covers every position up to max_model_len, computed from `rope_scaling`'s inv_freq
and attention factor, for a fixed `intp.factor` (the rotation is then vLLM's own op), or
a per-request module for `factor: "auto"` (the Triton kernel on GPU; on CPU per-token
cos/sin rows computed on the fly and vLLM's in-place rotary op).
"""

from __future__ import annotations

import torch

from intp_vllm_kernels.scaled_rotary import HAS_TRITON, rotate_qkv_

from intp_vllm.core.config import IntpConfig, rope_geometry
from intp_vllm.core.request_scale import all_code_scales, decode_positions
from intp_vllm.core.rope_scaling import PER_TOKEN_ROPE_TYPES, CheckpointRope, rope_inv_freq, yarn_ramp_bounds
from intp_vllm.vllm_ext.internals import RotaryEmbedding, rotary_embedding
from intp_vllm.vllm_ext.rotary import cos_sin_rows, inv_freq_per_scale

KERNEL_DEVICE_TYPES = ("cuda",)
"""Device types whose tensors `PerRequestRotaryEmbedding` rotates with the Triton kernel (elsewhere:
torch cos/sin rows and vLLM's rotary op). A test adds "cpu" to run the kernel's branch on CPU under
TRITON_INTERPRET=1 (tests/test_compiled_engine.py)."""


class ScaledRotaryEmbedding(RotaryEmbedding):
    """vLLM's rotary embedding over a table built for one RoPE scaling type and factor."""

    def __init__(self, *, head_size: int, rotary_dim: int, max_position: int, base: float, dtype: torch.dtype,
                 rope_type: str, factor: float, original_max_position: int, is_neox_style: bool = True,
                 checkpoint_factor: float = 1.0):
        self.rope_type = rope_type
        self.checkpoint_factor = checkpoint_factor
        self.factor = factor
        self.original_max_position = original_max_position
        super().__init__(head_size, rotary_dim, max_position, base, is_neox_style, dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq, attention_factor = rope_inv_freq(
            self.rope_type,
            base=self.base,
            rotary_dim=self.rotary_dim,
            factor=self.factor,
            original_max_position=self.original_max_position,
        )
        inv_freq = inv_freq / self.checkpoint_factor  # the checkpoint's own linear scaling (CheckpointRope)
        return cos_sin_rows(torch.arange(self.max_position_embeddings), inv_freq, attention_factor)

    def extra_repr(self) -> str:
        return (f"rope_type={self.rope_type}, factor={self.factor:g}, base={self.base:g}, "
                f"rotary_dim={self.rotary_dim}, positions={self.max_position_embeddings}")


class PerRequestRotaryEmbedding(torch.nn.Module):
    """Rotates q and k with each token's own RoPE scale, read from its encoded position.

    Used when `intp.factor` is "auto": requests in one batch keep their own scale (an
    8-frame request runs at s = 1, the original model) for prefill and decode alike.
    inv_freq is looked up per scale code (a small [codes, rotary_dim / 2] table built with
    `rope_scaling`, so each scale's numbers equal a model built for that scale alone) and
    cos/sin are computed on the fly from (position, inv_freq). On a GPU the Triton kernel
    does the same from (position, scale) in one in-place pass; on CPU the [T, rotary_dim]
    cos/sin rows are computed (fused by vLLM's torch.compile) and vLLM's own in-place rotary
    op applies row i to token i.
    """

    def __init__(self, *, head_size: int, rotary_dim: int, base: float, rope_type: str, original_max_position: int,
                 is_neox_style: bool = True, checkpoint_factor: float = 1.0):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.base = base
        self.rope_type = PER_TOKEN_ROPE_TYPES[rope_type]
        self.original_max_position = original_max_position
        self.is_neox_style = is_neox_style
        self.yarn_ramp = (yarn_ramp_bounds(base=base, rotary_dim=rotary_dim, original_max_position=original_max_position)
                          if self.rope_type == "yarn" else (0.0, 1.0))
        inv_freq, attention = inv_freq_per_scale(all_code_scales(), rope_type=self.rope_type, base=base,
                                                 rotary_dim=rotary_dim, original_max_position=original_max_position)
        self.checkpoint_factor = checkpoint_factor  # the checkpoint's own linear scaling (CheckpointRope)
        self.register_buffer("inv_freq_by_code", inv_freq / checkpoint_factor, persistent=False)
        self.register_buffer("attention_by_code", attention, persistent=False)
        self.register_buffer("scale_by_code", torch.tensor(all_code_scales(), dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        plain, codes = decode_positions(positions)
        if query.device.type in KERNEL_DEVICE_TYPES and key is not None and HAS_TRITON and self.checkpoint_factor == 1:
            # on the qkv that q and k were split from, whole: no copy of qkv under torch.compile
            return rotate_qkv_(plain, query, key, self.scale_by_code[codes], head_size=self.head_size,
                               rotary_dim=self.rotary_dim, is_neox=self.is_neox_style, rope_type=self.rope_type,
                               base=self.base, yarn_ramp=self.yarn_ramp)
        # Elsewhere: each token's own cos/sin row (computed once per token, not per head; in the
        # query's dtype, as vLLM's op gets its table), then vLLM's in-place rotary op reading row
        # i for token i. In place matters on CPU: an out-of-place rotation allocates q- and
        # k-sized buffers on every layer, and their page faults made it ~10x slower than the op.
        cos_sin = cos_sin_rows(plain, self.inv_freq_by_code[codes], self.attention_by_code[codes][:, None])
        rows = torch.arange(plain.shape[0], device=plain.device)
        rotary_embedding(rows, query, key, self.head_size, cos_sin.to(query.dtype), self.is_neox_style)
        return query, key

    def extra_repr(self) -> str:
        return (f"rope_type={self.rope_type}, factor=per request, base={self.base:g}, "
                f"rotary_dim={self.rotary_dim}, trained_context={self.original_max_position}")


def install_scaled_rope(language_model, text_config, intp: IntpConfig, max_model_len: int, dtype: torch.dtype):
    """Replace the rotary module of every attention layer of vLLM's Llama; returns the module.

    A numeric `intp.factor` gets a table for that one scale; "auto" gets the per-request module.
    A checkpoint's own linear RoPE scaling composes with INTP's by `CheckpointRope`'s rule (on a
    GPU the per-request module then computes cos/sin rows in torch: the kernel knows no such factor).
    """
    checkpoint = CheckpointRope.from_text_config(text_config)  # raises for rope types other than default/linear
    head_size, rotary_dim = rope_geometry(text_config)
    base, trained_context = checkpoint.base, checkpoint.max_position_embeddings
    if intp.factor == "auto":
        rope = PerRequestRotaryEmbedding(head_size=head_size, rotary_dim=rotary_dim, base=base,
                                         rope_type=intp.rope_type, original_max_position=trained_context,
                                         checkpoint_factor=checkpoint.linear_factor)
    else:
        rope = ScaledRotaryEmbedding(head_size=head_size, rotary_dim=rotary_dim, max_position=max_model_len,
                                     base=base, dtype=dtype, rope_type=intp.rope_type, factor=float(intp.factor),
                                     original_max_position=trained_context, checkpoint_factor=checkpoint.linear_factor)
    replaced = 0
    for layer in language_model.model.layers:
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            attention.rotary_emb = rope
            replaced += 1
    if replaced == 0:
        raise RuntimeError("found no attention layer with a rotary embedding in the language model")
    return rope
