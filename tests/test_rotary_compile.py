"""The per-request rotary op under torch.compile, as vLLM compiles it: no copy of qkv.

vLLM's Llama splits one fused projection, `q, k, v = qkv.split(...)`, and rotates q and k in
place. vLLM compiles with auto-functionalization v1, and Inductor clones every view an opaque
in-place op mutates unless it can re-inplace it (vLLM re-inplaces only its own rotary op): an op
on the q and k views costs two near-full copies of qkv a layer. `rotate_qkv_` hands the op the
qkv those views came from, whole, with column offsets, and Inductor then runs it on the
projection's own output buffer. This file compiles a Llama-attention-like prologue on CPU and
reads Inductor's generated code.

The op runs the Triton kernel, which on CPU runs only under Triton's interpreter, and Triton
fixes interpret-or-compile when a module's @triton.jit runs; the op is registered once per
process. So the test runs itself in a fresh process with TRITON_INTERPRET=1 from the start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("INTP_ROTARY_COMPILE_CHILD") == "1"
TOKENS, HEAD, Q_HEADS, K_HEADS, HIDDEN = 37, 64, 4, 2, 96
Q, K = Q_HEADS * HEAD, K_HEADS * HEAD
ROPE = dict(head_size=HEAD, rotary_dim=HEAD, is_neox=True, rope_type="yarn", base=10000.0, original_max_position=256)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    w = torch.randn(HIDDEN, Q + 2 * K, generator=g) / HIDDEN ** 0.5
    positions = torch.randint(0, 3000, (TOKENS,), generator=g)
    scales = torch.tensor([1.0, 2.0, 5.5])[torch.randint(0, 3, (TOKENS,), generator=g)]
    return x, w, positions, scales


def _compile_and_read(prologue):
    """Inductor's code for `prologue` compiled as vLLM compiles (auto-functionalization v1), and its outputs."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with inductor_config.patch(enable_auto_functionalized_v2=False):
        outputs, (code,) = run_and_get_code(torch.compile(prologue, fullgraph=True), *_inputs())
    return outputs, code


def _buffers_the_op_gets(code: str) -> tuple[str, list[set[str]]]:
    """(the buffer the qkv matmul writes, the buffers each call of our op reads) in Inductor's code."""
    projection = re.search(r"extern_kernels\.mm\([^\n]*out=(buf\d+)\)", code).group(1)
    calls = [set(re.findall(r"\bbuf\d+\b", line)) for line in code.splitlines()
             if "torch.ops.intp_vllm.scaled_rotary_qkv_" in line]
    return projection, calls


@pytest.mark.skipif(not CHILD, reason="runs in the child process (test_rotary_op_in_a_compiled_graph_...)")
def test_child_rotary_on_qkv_whole_compiles_without_a_copy():
    from intp_vllm_kernels.scaled_rotary import _interpreting, rotate_qkv_, scaled_rotary_qkv_op

    from intp_vllm.core.rope_scaling import yarn_ramp_bounds
    from intp_vllm.vllm_ext.rotary import apply_scaled_rotary

    assert _interpreting()
    kernel_rope = {k: v for k, v in ROPE.items() if k != "original_max_position"}
    kernel_rope["yarn_ramp"] = yarn_ramp_bounds(base=ROPE["base"], rotary_dim=HEAD, original_max_position=256)

    def llama_prologue(x, w, positions, scales):  # vLLM's LlamaAttention.forward up to the attention
        qkv = x @ w
        q, k, v = qkv.split([Q, K, K], dim=-1)
        q, k = rotate_qkv_(positions, q, k, scales, **kernel_rope)
        return q * 1.0, k * 1.0, v * 1.0

    def on_views(x, w, positions, scales):  # negative control: the op on the q and k views
        qkv = x @ w
        q, k, v = qkv.split([Q, K, K], dim=-1)
        rope = tuple(kernel_rope.values())[:5] + tuple(kernel_rope["yarn_ramp"])
        scaled_rotary_qkv_op(positions, q, scales, 0, Q, 0, 0, *rope)
        scaled_rotary_qkv_op(positions, k, scales, 0, K, 0, 0, *rope)
        return q * 1.0, k * 1.0, v * 1.0

    x, w, positions, scales = _inputs()
    q, k, v = (x @ w).split([Q, K, K], dim=-1)
    expected_q, expected_k = apply_scaled_rotary(positions, q, k, scales, **ROPE)
    (got_q, got_k, got_v), code = _compile_and_read(llama_prologue)
    torch.testing.assert_close(got_q, expected_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, expected_k, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_v, v, rtol=0, atol=0)
    projection, calls = _buffers_the_op_gets(code)
    assert calls == [{projection}], code  # one call, on the matmul's own output buffer: no copy of qkv
    assert "clone" not in code
    # negative control: on the views, Inductor copies each out of qkv first (its numerics are not checked:
    # Inductor's code for two in-place ops on views of one buffer left k's copy partly unwritten here)
    _, code = _compile_and_read(on_views)
    projection, calls = _buffers_the_op_gets(code)
    assert len(calls) == 2 and all(projection not in call for call in calls), code
    assert "clone" in code


@pytest.mark.skipif(CHILD, reason="this is the child")
def test_rotary_op_in_a_compiled_graph_gets_qkv_whole_in_a_fresh_interpreted_process():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "INTP_ROTARY_COMPILE_CHILD": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_child", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout, run.stdout[-2000:]


def test_split_from_finds_the_fused_tensor_of_a_q_k_v_split():
    from intp_vllm_kernels.scaled_rotary import split_from

    qkv = torch.randn(5, Q + 2 * K)
    q, k, v = qkv.split([Q, K, K], dim=-1)
    assert split_from(q, k) is qkv
    assert split_from(q.clone(), k) is None and split_from(q, None) is None
    assert split_from(q, torch.randn(5, Q + 2 * K).split([Q, K, K], dim=-1)[1]) is None  # another tensor's key
    assert split_from(q, v) is None  # not right after the query (eager mode checks the offsets)
    assert split_from(*torch.randn(5, Q + 3 * K).split([Q, K, 2 * K], dim=-1)[:2]) is None  # not q | k | v
    wide = torch.randn(Q + 2 * K, 5).t()
    assert split_from(*wide.split([Q, K, K], dim=-1)[:2]) is None  # rows not stride 1
