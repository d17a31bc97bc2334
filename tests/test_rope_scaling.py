"""RoPE scaling math against transformers' ROPE_INIT_FUNCTIONS for the same parameters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from intp_vllm.core.rope_scaling import (
    ROPE_SCALING_FUNCTIONS,
    CheckpointRope,
    auto_factor,
    hf_rope_parameters,
    rope_inv_freq,
)

ORIGINAL = 4096
FACTORS = [1.0, 2.0, 4.0, 7.75]
DIMS = [32, 64, 128]
BASES = [10000.0, 500000.0]


def hf_inv_freq(rope_parameters: dict, head_dim: int, seq_len=None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention factor) for a small Llama with these rope_parameters."""
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=ORIGINAL, rope_parameters=rope_parameters)
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def reference(rope_type: str, base: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    """transformers' numbers for our type, written out here rather than via hf_rope_parameters."""
    if rope_type == "none":
        return hf_inv_freq({"rope_type": "default", "rope_theta": base}, dim)
    if rope_type == "ntk":  # the paper's formula, as plain RoPE at the scaled base
        return hf_inv_freq({"rope_type": "default", "rope_theta": base * factor ** (dim / (dim - 2))}, dim)
    if rope_type == "dynamic":  # our default length: the context the factor was chosen for
        return hf_inv_freq({"rope_type": "dynamic", "factor": factor, "rope_theta": base}, dim,
                           seq_len=int(factor * ORIGINAL))
    if rope_type == "linear":
        return hf_inv_freq({"rope_type": "linear", "factor": factor, "rope_theta": base}, dim)
    return hf_inv_freq({"rope_type": "yarn", "factor": factor, "rope_theta": base,
                        "original_max_position_embeddings": ORIGINAL}, dim)


def ours(rope_type, base, dim, factor, **kwargs):
    return rope_inv_freq(rope_type, base=base, rotary_dim=dim, factor=factor, original_max_position=ORIGINAL,
                         **kwargs)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING_FUNCTIONS))
def test_equals_transformers(rope_type, base, dim, factor):
    inv_freq, attention = ours(rope_type, base, dim, factor)
    expected, expected_attention = reference(rope_type, base, dim, factor)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (dim // 2,)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(expected_attention, rel=1e-9)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING_FUNCTIONS))
def test_hf_rope_parameters_round_trip(rope_type, base, dim, factor):
    """The rope_parameters we give HF reference models make transformers compute our inv_freq."""
    inv_freq, attention = ours(rope_type, base, dim, factor)
    params = hf_rope_parameters(rope_type, base=base, rotary_dim=dim, factor=factor, original_max_position=ORIGINAL)
    expected, expected_attention = hf_inv_freq(params, dim)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert attention == pytest.approx(expected_attention, rel=1e-9)


@pytest.mark.parametrize("factor", [1.0, 2.0])
@pytest.mark.parametrize("seq_len", [ORIGINAL // 2, ORIGINAL, 3 * ORIGINAL, 10_000])
def test_dynamic_equals_transformers_at_a_sequence_length(factor, seq_len):
    inv_freq, _ = ours("dynamic", 10000.0, 64, factor, seq_len=seq_len)
    expected, _ = hf_inv_freq({"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0}, 64, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    params = hf_rope_parameters("dynamic", base=10000.0, rotary_dim=64, factor=factor,
                                original_max_position=ORIGINAL, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, hf_inv_freq(params, 64)[0].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [2.0, 4.0, 7.75])
def test_per_request_dynamic_is_ntk_at_the_request_scale(scale):
    """Dynamic at factor 1 and a request of s * L tokens is the paper's NTK at s."""
    dynamic, _ = ours("dynamic", 10000.0, 64, 1.0, seq_len=scale * ORIGINAL)
    ntk, _ = ours("ntk", 10000.0, 64, scale)
    torch.testing.assert_close(dynamic, ntk, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope_type", sorted(ROPE_SCALING_FUNCTIONS))
@pytest.mark.parametrize("dim", DIMS)
def test_factor_one_is_the_original_model_exactly(rope_type, dim):
    plain, _ = ours("none", 10000.0, dim, 1.0)
    inv_freq, attention = ours(rope_type, 10000.0, dim, 1.0)
    assert torch.equal(inv_freq, plain) and attention == 1.0
    params = hf_rope_parameters(rope_type, base=10000.0, rotary_dim=dim, factor=1.0, original_max_position=ORIGINAL)
    assert params == {"rope_type": "default", "rope_theta": 10000.0}


def test_dynamic_below_the_trained_context_is_unscaled():
    plain, _ = ours("none", 10000.0, 64, 1.0)
    assert torch.equal(ours("dynamic", 10000.0, 64, 2.0, seq_len=ORIGINAL // 2)[0], plain)


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn", "dynamic"])
def test_a_wrong_factor_changes_inv_freq(rope_type):
    """Negative control for the equality tests above: they can fail."""
    right, _ = ours(rope_type, 10000.0, 64, 4.0)
    wrong, _ = reference(rope_type, 10000.0, 64, 3.0)
    assert not torch.allclose(right, wrong.float(), rtol=1e-4)


def test_yarn_attention_factor():
    assert ours("yarn", 10000.0, 64, 4.0)[1] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


@pytest.mark.parametrize("needed, trained, factor", [(100, 4096, 1.0), (4096, 4096, 1.0), (8192, 4096, 2.0),
                                                     (31744, 4096, 7.75)])
def test_auto_factor(needed, trained, factor):
    assert auto_factor(needed, trained) == factor


@pytest.mark.parametrize(
    "rope_type, kwargs, message",
    [
        ("ntk-aware", {}, "rope_type 'ntk-aware' is not one of none, linear, ntk, yarn, dynamic"),
        ("linear", {"factor": 0.5}, "RoPE factor must be >= 1, got 0.5"),
        ("linear", {"rotary_dim": 63}, "rotary_dim must be an even number >= 4, got 63"),
        ("linear", {"original_max_position": 0}, "original_max_position must be > 0, got 0"),
        ("ntk", {"seq_len": 8192}, "seq_len applies only to rope_type 'dynamic', got seq_len=8192 for 'ntk'"),
        ("dynamic", {"seq_len": 0}, "seq_len must be > 0, got 0"),
    ],
)
def test_errors_name_the_bad_input(rope_type, kwargs, message):
    params = {"base": 10000.0, "rotary_dim": 64, "factor": 2.0, "original_max_position": ORIGINAL, **kwargs}
    with pytest.raises(ValueError, match=message):
        rope_inv_freq(rope_type, **params)
    with pytest.raises(ValueError, match=message):
        hf_rope_parameters(rope_type, **params)


def test_auto_factor_rejects_an_empty_context():
    with pytest.raises(ValueError, match="trained_context must be > 0, got 0"):
        auto_factor(10, 0)


# ---- a checkpoint's own linear RoPE (CheckpointRope): one rule, against numbers written out by hand ----

def hand_plain(base: float, dim: int) -> torch.Tensor:
    """base^(-2i/d), written out."""
    return torch.tensor([1.0 / base ** (2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def hand_yarn(base: float, dim: int, factor: float, original: int) -> torch.Tensor:
    """YaRN (NTK-by-parts) written out: per frequency, the ramp between beta 32 and 1 turns over
    `original` positions; interpolate (/ factor) below it, extrapolate above."""
    import math

    def dim_of(turns):
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), dim - 1)
    plain = hand_plain(base, dim)
    ramp = torch.tensor([min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)], dtype=torch.float64)
    return plain / factor * ramp + plain * (1 - ramp)


@pytest.mark.parametrize("dim", [64, 128])
def test_checkpoint_linear_at_scale_one_is_the_checkpoint_exactly(dim):
    """Up to the trained length (s = 1) every INTP type is the checkpoint's linear x2, bit for bit
    transformers' linear type."""
    checkpoint = CheckpointRope({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, 4096)
    hf, _ = hf_inv_freq({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, dim)
    for rope_type in ROPE_SCALING_FUNCTIONS:
        inv_freq, attention = checkpoint.inv_freq(rope_type, rotary_dim=dim, factor=1.0)
        assert torch.equal(inv_freq, hf), rope_type
        assert attention == 1.0


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("factor", [1.5, 4.0])
def test_checkpoint_linear_composes_by_the_documented_rule(dim, factor):
    """inv_freq = INTP_type(s; base, d, L) / c, attention INTP's; hand-computed in float64."""
    import math

    base, c, original = 10000.0, 2.0, 4096
    checkpoint = CheckpointRope({"rope_type": "linear", "factor": c, "rope_theta": base}, original)
    expected = {
        "linear": (hand_plain(base, dim) / (factor * c), 1.0),
        "ntk": (hand_plain(base * factor ** (dim / (dim - 2)), dim) / c, 1.0),
        "yarn": (hand_yarn(base, dim, factor, original) / c, 0.1 * math.log(factor) + 1),
        "none": (hand_plain(base, dim) / c, 1.0),
    }
    for rope_type, (inv_freq, attention) in expected.items():
        ours, ours_attention = checkpoint.inv_freq(rope_type, rotary_dim=dim, factor=factor)
        torch.testing.assert_close(ours.double(), inv_freq, rtol=1e-6, atol=0)
        assert ours_attention == pytest.approx(attention)
    # negative control: ignoring the checkpoint's factor is not the rule
    plain, _ = rope_inv_freq("linear", base=base, rotary_dim=dim, factor=factor, original_max_position=original)
    assert not torch.allclose(plain.double(), expected["linear"][0])


def test_checkpoint_trained_context_and_hf_parameters():
    """The scale is measured against c * L; transformers expresses linear and NTK over a linear
    checkpoint (and gets the same inv_freq), not YaRN."""
    checkpoint = CheckpointRope({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, 4096)
    assert checkpoint.trained_context == 8192
    assert CheckpointRope({"rope_type": "default", "rope_theta": 1e4}, 4096).trained_context == 4096
    for rope_type in ("linear", "ntk", "none"):
        params = checkpoint.hf_rope_parameters(rope_type, rotary_dim=64, factor=3.0)
        hf, _ = hf_inv_freq(params, 64)
        ours, _ = checkpoint.inv_freq(rope_type, rotary_dim=64, factor=3.0)
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    assert checkpoint.hf_rope_parameters("ntk", rotary_dim=64, factor=1.0) == {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="no rope type for yarn"):
        checkpoint.hf_rope_parameters("yarn", rotary_dim=64, factor=3.0)


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'yarn'.*'default' or 'linear'"),
    ({"rope_type": "linear", "factor": 0.5, "rope_theta": 1e4}, "linear RoPE factor must be >= 1"),
])
def test_checkpoint_rope_refuses_what_it_cannot_compose(params, message):
    with pytest.raises(ValueError, match=message):
        CheckpointRope(params, 4096)
