"""The per-token-scale rotary embedding (torch path) against vLLM's and transformers' RoPE."""

from __future__ import annotations

import pytest
import torch

from intp_vllm.core.rope_scaling import rope_inv_freq
from intp_vllm.vllm_ext.rotary import apply_scaled_rotary

BASE = 10000.0
ORIGINAL = 256


def qk(tokens=12, q_heads=4, k_heads=2, head_size=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, q_heads * head_size, generator=g).to(dtype)
    k = torch.randn(tokens, k_heads * head_size, generator=g).to(dtype)
    return q, k


def ours(positions, q, k, scales, rope_type, head_size=64, rotary_dim=64, is_neox=True):
    return apply_scaled_rotary(positions, q.clone(), k.clone(), scales, head_size=head_size, rotary_dim=rotary_dim,
                               is_neox=is_neox, rope_type=rope_type, base=BASE, original_max_position=ORIGINAL)


def vllm_table_rope(rope_type, factor, head_size, rotary_dim, is_neox, max_position=4096):
    from vllm.config import VllmConfig, set_current_vllm_config

    from intp_vllm.vllm_ext.llm_rope import ScaledRotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        return ScaledRotaryEmbedding(head_size=head_size, rotary_dim=rotary_dim, max_position=max_position, base=BASE,
                                     dtype=torch.float32, rope_type=rope_type, factor=factor,
                                     original_max_position=ORIGINAL, is_neox_style=is_neox)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn"])
@pytest.mark.usefixtures("vllm_config_here")
def test_scale_one_is_vllms_plain_rotary_embedding(rope_type, rotary_dim, is_neox):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        plain = RotaryEmbedding(64, rotary_dim, 4096, BASE, is_neox, torch.float32)
    positions = torch.tensor([0, 1, 5, 100, 257, 3000, 7, 8, 9, 10, 11, 4095])
    q, k = qk()
    expected_q, expected_k = plain.forward_native(positions, q.clone(), k.clone())
    got_q, got_k = ours(positions, q, k, torch.ones(12), rope_type, rotary_dim=rotary_dim, is_neox=is_neox)
    torch.testing.assert_close(got_q, expected_q, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_k, expected_k, rtol=0, atol=2e-6)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("factor", [2.0, 5.5])
@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
@pytest.mark.usefixtures("vllm_config_here")
def test_one_scale_equals_the_table_for_that_scale(rope_type, factor, is_neox):
    table = vllm_table_rope(rope_type, factor, 64, 64, is_neox)
    positions = torch.arange(0, 4096, 341)
    q, k = qk(tokens=len(positions))
    expected_q, expected_k = table.forward_native(positions, q.clone(), k.clone())
    got_q, got_k = ours(positions, q, k, torch.full((len(positions),), factor), rope_type, is_neox=is_neox)
    torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-5, atol=1e-5)
    wrong_q, _ = ours(positions, q, k, torch.full((len(positions),), factor * 1.1), rope_type, is_neox=is_neox)
    assert not torch.allclose(wrong_q, expected_q, atol=1e-3)  # negative control


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_mixed_scales_in_one_batch_equal_each_token_alone(rope_type):
    positions = torch.tensor([3, 900, 17, 2048, 64, 5])
    scales = torch.tensor([1.0, 4.0, 1.0, 7.5, 2.0, 4.0])
    q, k = qk(tokens=6, q_heads=3, k_heads=1)
    got_q, got_k = ours(positions, q, k, scales, rope_type)
    for i in range(6):
        alone_q, alone_k = ours(positions[i:i + 1], q[i:i + 1], k[i:i + 1], scales[i:i + 1], rope_type)
        torch.testing.assert_close(got_q[i:i + 1], alone_q, rtol=0, atol=0)
        torch.testing.assert_close(got_k[i:i + 1], alone_k, rtol=0, atol=0)


@pytest.mark.parametrize("factor", [1.0, 3.0])
@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn"])
def test_equals_transformers_llama_rope(rope_type, factor):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from intp_vllm.core.rope_scaling import hf_rope_parameters

    params = hf_rope_parameters(rope_type, base=BASE, rotary_dim=64, factor=factor, original_max_position=ORIGINAL)
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=ORIGINAL, rope_parameters=params)
    positions = torch.arange(0, 1200, 97)
    q, k = qk(tokens=len(positions))
    hf_q = q.view(1, len(positions), 4, 64).transpose(1, 2)
    hf_k = k.view(1, len(positions), 2, 64).transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(config)(hf_q, positions[None])
    expected_q, expected_k = apply_rotary_pos_emb(hf_q, hf_k, cos, sin)
    got_q, got_k = ours(positions, q, k, torch.full((len(positions),), factor), rope_type)
    torch.testing.assert_close(got_q, expected_q.transpose(1, 2).reshape_as(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, expected_k.transpose(1, 2).reshape_as(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_stays_close_to_fp32(dtype, atol):
    positions = torch.arange(12) * 50
    scales = torch.tensor([1.0, 2.0, 3.0] * 4)
    q, k = qk()
    ref_q, ref_k = ours(positions, q, k, scales, "yarn")
    got_q, got_k = ours(positions, q.to(dtype), k.to(dtype), scales, "yarn")
    assert got_q.dtype == dtype
    torch.testing.assert_close(got_q.float(), ref_q, rtol=0, atol=atol)
    torch.testing.assert_close(got_k.float(), ref_k, rtol=0, atol=atol)


def per_token_reference(positions, x, scales, *, rope_type, head_size, rotary_dim, is_neox):
    """Straightforward reference: for each token, rope_inv_freq at its own scale, the textbook rotation, fp64."""
    out = x.double().clone().view(len(positions), -1, head_size)
    half = rotary_dim // 2
    for t in range(len(positions)):
        inv, att = rope_inv_freq(rope_type, base=BASE, rotary_dim=rotary_dim, factor=float(scales[t]),
                                 original_max_position=ORIGINAL)
        angle = float(positions[t]) * inv.double()
        cos, sin = angle.cos() * att, angle.sin() * att
        for h in range(out.shape[1]):
            idx1 = torch.arange(half) if is_neox else torch.arange(0, rotary_dim, 2)
            idx2 = idx1 + half if is_neox else idx1 + 1
            x1, x2 = out[t, h, idx1].clone(), out[t, h, idx2].clone()
            out[t, h, idx1] = x1 * cos - x2 * sin
            out[t, h, idx2] = x2 * cos + x1 * sin
    return out.view(x.shape)


CASES = [  # (head_size, rotary_dim, q_heads, k_heads)
    (64, 64, 4, 2),
    (64, 32, 3, 1),
    (80, 48, 5, 5),
]


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn"])
def test_mixed_scales_equal_a_per_token_reference(rope_type, case, is_neox):
    head_size, rotary_dim, q_heads, k_heads = case
    g = torch.Generator().manual_seed(1)
    tokens = 11
    positions = torch.randint(0, 3000, (tokens,), generator=g)
    scales = torch.tensor([1.0, 2.0, 4.5, 8.0])[torch.randint(0, 4, (tokens,), generator=g)]
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, generator=g)
    q, k, _ = qkv.split([q_heads * head_size, k_heads * head_size, k_heads * head_size], dim=-1)  # strided views
    kw = dict(head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox, rope_type=rope_type, base=BASE,
              original_max_position=ORIGINAL)
    expected_q = per_token_reference(positions, q, scales, **{k: v for k, v in kw.items() if k not in ("base", "original_max_position")})
    expected_k = per_token_reference(positions, k, scales, **{k: v for k, v in kw.items() if k not in ("base", "original_max_position")})
    before = qkv.clone()
    got_q, got_k = apply_scaled_rotary(positions, q, k, scales, **kw)
    assert torch.equal(qkv, before)  # inputs untouched
    # fp32 angles of positions < 3000 carry ~3000 * 2**-24 of rounding; the reference is fp64
    torch.testing.assert_close(got_q.double(), expected_q, rtol=0, atol=2e-3)
    torch.testing.assert_close(got_k.double(), expected_k, rtol=0, atol=2e-3)
    if rope_type != "none":  # negative control: the same batch at one scale differs
        wrong_q, _ = apply_scaled_rotary(positions, q, k, torch.full((tokens,), 2.0), **kw)
        assert (wrong_q.double() - expected_q).abs().max() > 1e-2


@pytest.mark.usefixtures("vllm_ops")
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_serving_module_on_cpu_equals_the_reference(rope_type, case, is_neox):
    """`PerRequestRotaryEmbedding` as the engine calls it on CPU: scale codes inside the positions,
    strided q/k views of one qkv tensor rotated in place (vLLM's op over per-token cos/sin rows)."""
    from intp_vllm.vllm_ext.llm_rope import PerRequestRotaryEmbedding
    from intp_vllm.core.request_scale import POSITION_BITS, all_code_scales, scale_code

    head_size, rotary_dim, q_heads, k_heads = case
    g = torch.Generator().manual_seed(2)
    tokens = 13
    positions = torch.randint(0, 3000, (tokens,), generator=g)
    codes = torch.tensor([scale_code(s) for s in (1.0, 2.0, 4.5, 8.0)])[torch.randint(0, 4, (tokens,), generator=g)]
    scales = torch.tensor(all_code_scales())[codes]
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, generator=g)
    q, k, v = qkv.split([q_heads * head_size, k_heads * head_size, k_heads * head_size], dim=-1)
    expected_q, expected_k = apply_scaled_rotary(positions, q, k, scales, head_size=head_size, rotary_dim=rotary_dim,
                                                 is_neox=is_neox, rope_type=rope_type, base=BASE,
                                                 original_max_position=ORIGINAL)
    original_q, v_before = q.clone(), v.clone()
    module = PerRequestRotaryEmbedding(head_size=head_size, rotary_dim=rotary_dim, base=BASE, rope_type=rope_type,
                                       original_max_position=ORIGINAL, is_neox_style=is_neox)
    got_q, got_k = module(positions | (codes << POSITION_BITS), q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(q, expected_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=1e-5)
    assert torch.equal(v, v_before)

    # negative control: without the codes (every token at scale 1) the rotation differs
    module(positions, original_q, None)
    assert (original_q - expected_q).abs().max() > 1e-2


def test_key_none_and_empty_batch():
    positions = torch.arange(6)
    q, _ = qk(tokens=6)
    kw = dict(head_size=64, rotary_dim=64, is_neox=True, rope_type="linear", base=BASE, original_max_position=ORIGINAL)
    got_q, none_k = apply_scaled_rotary(positions, q, None, torch.full((6,), 2.0), **kw)
    assert none_k is None and got_q.shape == q.shape and not torch.equal(got_q, q)
    empty = torch.empty(0, 256)
    got_q, got_k = apply_scaled_rotary(torch.empty(0, dtype=torch.long), empty, empty[:, :128], torch.empty(0), **kw)
    assert got_q.shape == (0, 256) and got_k.shape == (0, 128)


def test_bad_inputs_raise():
    q, k = qk(tokens=4)
    kw = dict(head_size=64, rotary_dim=64, is_neox=True, rope_type="yarn", base=BASE, original_max_position=ORIGINAL)
    with pytest.raises(TypeError, match="positions must be a 1-D integer"):
        apply_scaled_rotary(torch.arange(4.0), q, k, torch.ones(4), **kw)
    with pytest.raises(ValueError, match="scales must be a 1-D float tensor of length T=4"):
        apply_scaled_rotary(torch.arange(4), q, k, torch.ones(3), **kw)
    with pytest.raises(ValueError, match="rope_type 'llama3' is not one of none, linear, ntk, yarn"):
        apply_scaled_rotary(torch.arange(4), q, k, torch.ones(4), **{**kw, "rope_type": "llama3"})
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        apply_scaled_rotary(torch.arange(4), q, k, torch.ones(4), **{**kw, "rotary_dim": 65})
    with pytest.raises(TypeError, match="query dtype must be one of"):
        apply_scaled_rotary(torch.arange(4), q.double(), k, torch.ones(4), **kw)


@pytest.mark.usefixtures("vllm_ops", "vllm_config_here")
@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_both_modules_compose_with_a_checkpoints_linear_x2(rope_type):
    """Over a checkpoint with linear RoPE x2: at scale 1 both rotary modules are vLLM's own
    LinearScalingRotaryEmbedding x2 (the checkpoint as trained); at scale s they rotate with
    `CheckpointRope.inv_freq` (INTP's type at s, divided by 2)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import LinearScalingRotaryEmbedding

    from intp_vllm.core.request_scale import POSITION_BITS, code_scale, scale_code
    from intp_vllm.core.rope_scaling import CheckpointRope
    from intp_vllm.vllm_ext.llm_rope import PerRequestRotaryEmbedding, ScaledRotaryEmbedding
    from intp_vllm.vllm_ext.rotary import rotate_with_inv_freq

    checkpoint = CheckpointRope({"rope_type": "linear", "factor": 2.0, "rope_theta": BASE}, ORIGINAL)
    positions = torch.tensor([0, 1, 5, 100, 255, 511, 700, 1000, 1500, 2000, 2047, 3])
    q, k = qk()
    with set_current_vllm_config(VllmConfig()):
        checkpoint_rope = LinearScalingRotaryEmbedding(64, 64, 4096, BASE, True, 2.0, torch.float32)
        fixed = {s: ScaledRotaryEmbedding(head_size=64, rotary_dim=64, max_position=4096, base=BASE,
                                          dtype=torch.float32, rope_type=rope_type, factor=s,
                                          original_max_position=ORIGINAL, checkpoint_factor=2.0)
                 for s in (1.0, code_scale(scale_code(3.0)))}
        unscaled_checkpoint = ScaledRotaryEmbedding(head_size=64, rotary_dim=64, max_position=4096, base=BASE,
                                                    dtype=torch.float32, rope_type=rope_type, factor=1.0,
                                                    original_max_position=ORIGINAL)
    per_request = PerRequestRotaryEmbedding(head_size=64, rotary_dim=64, base=BASE, rope_type=rope_type,
                                            original_max_position=ORIGINAL, checkpoint_factor=2.0)
    expected = {1.0: checkpoint_rope.forward_native(positions, q.clone(), k.clone())}
    scale = code_scale(scale_code(3.0))
    inv_freq, attention = checkpoint.inv_freq(rope_type, rotary_dim=64, factor=scale)
    expected[scale] = rotate_with_inv_freq(positions, q, k, inv_freq.expand(12, -1), torch.full((12,), attention),
                                           head_size=64, rotary_dim=64, is_neox=True)
    for s, (expected_q, expected_k) in expected.items():
        got_q, got_k = fixed[s].forward_native(positions, q.clone(), k.clone())
        torch.testing.assert_close(got_q, expected_q, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_k, expected_k, rtol=0, atol=1e-5)
        got_q, got_k = q.clone(), k.clone()
        per_request(positions | (scale_code(s) << POSITION_BITS), got_q, got_k)
        torch.testing.assert_close(got_q, expected_q, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_k, expected_k, rtol=0, atol=1e-5)
    # negative control: without the checkpoint's factor, scale 1 is another rotation
    plain_q, _ = unscaled_checkpoint.forward_native(positions, q.clone(), k.clone())
    assert (plain_q - expected[1.0][0]).abs().max() > 1e-2
