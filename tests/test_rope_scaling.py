"""RoPE scaling math against transformers' ROPE_INIT_FUNCTIONS for the same parameters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from intp_vllm.rope_scaling import hf_rope_parameters, ntk_base, rope_inv_freq

ORIGINAL = 4096
FACTORS = [1.0, 2.0, 4.0, 7.75]
DIMS = [32, 64, 128]
BASES = [10000.0, 500000.0]


def hf_inv_freq(rope_parameters: dict, head_dim: int, seq_len=None):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=ORIGINAL, rope_parameters=rope_parameters)
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def ours(rope_type, base, dim, factor):
    return rope_inv_freq(rope_type, base=base, rotary_dim=dim, factor=factor, original_max_position=ORIGINAL)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn"])
def test_equals_transformers(rope_type, base, dim, factor):
    inv_freq, attention = ours(rope_type, base, dim, factor)
    params = hf_rope_parameters(rope_type, base=base, rotary_dim=dim, factor=factor, original_max_position=ORIGINAL)
    expected, expected_attention = hf_inv_freq(params, dim)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (dim // 2,)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(expected_attention, rel=1e-9)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_ntk_is_transformers_dynamic_at_the_scaled_length(factor):
    """NTK-aware = transformers' dynamic NTK (factor 1) evaluated at s * L tokens."""
    inv_freq, _ = ours("ntk", 10000.0, 64, factor)
    expected, _ = hf_inv_freq({"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0}, 64,
                              seq_len=int(factor * ORIGINAL))
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn", "dynamic"])
def test_factor_one_is_the_original_model_exactly(rope_type):
    plain, _ = ours("none", 10000.0, 128, 1.0)
    inv_freq, attention = ours(rope_type, 10000.0, 128, 1.0)
    assert torch.equal(inv_freq, plain) and attention == 1.0


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_a_wrong_factor_changes_inv_freq(rope_type):
    """Negative control for the equality tests above."""
    right, _ = ours(rope_type, 10000.0, 64, 4.0)
    params = hf_rope_parameters(rope_type, base=10000.0, rotary_dim=64, factor=3.0, original_max_position=ORIGINAL)
    wrong, _ = hf_inv_freq(params, 64)
    assert not torch.allclose(right, wrong.float(), rtol=1e-4)


def test_ntk_base_is_the_papers_formula():
    assert ntk_base(10000.0, 128, 4.0) == pytest.approx(10000.0 * 4.0 ** (128 / 126))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_type="ntk-aware", factor=2.0, rotary_dim=64), "rope_type 'ntk-aware' is not one of none, linear"),
        (dict(rope_type="linear", factor=0.5, rotary_dim=64), "RoPE factor must be >= 1, got 0.5"),
        (dict(rope_type="linear", factor=2.0, rotary_dim=63), "rotary_dim must be an even number >= 4, got 63"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rope_inv_freq(kwargs["rope_type"], base=10000.0, rotary_dim=kwargs["rotary_dim"], factor=kwargs["factor"],
                      original_max_position=ORIGINAL)
