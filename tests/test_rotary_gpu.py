"""The Triton kernel compiled for a real GPU, against the torch reference (skipped without CUDA).

CI has no GPU: these run on a GPU machine; the kernel's numerics are covered everywhere by
tests/test_rotary_triton.py under Triton's interpreter. Triton fixes interpreted-or-compiled
per process, so on a GPU run this file in its own pytest process:
`pytest tests/test_rotary_gpu.py` (README, "GPU").
"""

from __future__ import annotations

import pytest
import torch

from intp_vllm.core.rope_scaling import yarn_ramp_bounds
from intp_vllm.vllm_ext.rotary import apply_scaled_rotary
from rotary_args import for_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = 10000.0
ORIGINAL = 2056
RAMP = yarn_ramp_bounds(base=BASE, rotary_dim=128, original_max_position=ORIGINAL)
SCALES = torch.tensor([1.0, 2.0, 4.0, 7.75, 16.0])
MAX_POSITION = 40960
"""Positions up to 40K: 128 frames of Video-LLaVA-7B reach ~33K tokens."""


@pytest.fixture(autouse=True)
def _compiled_not_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def fused_qkv(tokens, head_size, q_heads, k_heads, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, generator=g).to(dtype).cuda()
    q, k, _ = qkv.split([q_heads * head_size, k_heads * head_size, k_heads * head_size], dim=-1)
    return qkv, q, k


def mixed_batch(tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=g)
    positions[:2] = torch.tensor([MAX_POSITION - 1, 0])
    return positions.cuda(), SCALES[torch.randint(0, len(SCALES), (tokens,), generator=g)].cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rope_type", ["none", "linear", "ntk", "yarn"])
@pytest.mark.parametrize("case", [(128, 128, 32, 8), (128, 64, 12, 4), (80, 80, 5, 1)])
def test_kernel_on_gpu_equals_torch_reference(case, rope_type, is_neox, dtype):
    from intp_vllm_kernels.scaled_rotary import scaled_rotary_

    head_size, rotary_dim, q_heads, k_heads = case
    positions, scales = mixed_batch(3001)
    qkv, q, k = fused_qkv(3001, head_size, q_heads, k_heads, dtype)
    kw = dict(head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox, rope_type=rope_type, base=BASE,
              original_max_position=ORIGINAL)
    expected_q, expected_k = apply_scaled_rotary(positions, q.float(), k.float(), scales, **kw)
    v_before = qkv[:, (q_heads + k_heads) * head_size:].clone()
    scaled_rotary_(positions, q, k, scales, **for_kernel(kw))
    # fp32 angles at positions < 40960 carry ~40960 * 2**-24 rad (4e-3 held at 16384 on an H100); half
    # precision adds one rounding. ntk: base' ** (2i/d) in fp64 vs torch's fp32 pow, 1.4e-2 at 40K under
    # Triton's interpreter
    for got, expected in ((q, expected_q), (k, expected_k)):
        atol = (2.5e-2 if rope_type == "ntk" else 1e-2)
        atol += torch.finfo(dtype).eps * expected.abs().max().item() if dtype != torch.float32 else 0
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=atol)
    assert torch.equal(qkv[:, (q_heads + k_heads) * head_size:], v_before)
    if rope_type != "none":  # negative control: every token at one scale is visibly different
        one_q, _ = apply_scaled_rotary(positions, *fused_qkv(3001, head_size, q_heads, k_heads, torch.float32)[1:],
                                       torch.ones_like(scales), **kw)
        assert (one_q - q.float()).abs().max() > 0.1


def test_custom_op_inside_torch_compile_rotates_qkv_in_place():
    from intp_vllm_kernels.scaled_rotary import rotate_qkv_

    positions, scales = mixed_batch(777, seed=1)
    qkv, q, k = fused_qkv(777, 128, 8, 2, torch.bfloat16, seed=1)
    expected_q, expected_k = apply_scaled_rotary(positions, q.float(), k.float(), scales, head_size=128,
                                                 rotary_dim=128, is_neox=True, rope_type="yarn", base=BASE,
                                                 original_max_position=ORIGINAL)

    @torch.compile(fullgraph=True, dynamic=True)
    def attention_prologue(positions, qkv, scales):  # as vLLM's Llama: rotate the q and k split from qkv
        q, k, v = qkv.split([8 * 128, 2 * 128, 2 * 128], dim=-1)
        q, k = rotate_qkv_(positions, q, k, scales, head_size=128, rotary_dim=128, is_neox=True, rope_type="yarn",
                           base=BASE, yarn_ramp=RAMP)
        return q * 1.0, k * 1.0

    got_q, got_k = attention_prologue(positions, qkv, scales)
    atol = 1e-2 + torch.finfo(torch.bfloat16).eps * expected_q.abs().max().item()
    torch.testing.assert_close(got_q.float(), expected_q, rtol=0, atol=atol)
    torch.testing.assert_close(got_k.float(), expected_k, rtol=0, atol=atol)
    torch.testing.assert_close(q.float(), expected_q, rtol=0, atol=atol)  # qkv was rotated in place
