"""The Triton per-token-scale rotary kernel, run on CPU by Triton's interpreter, against the torch path.

Triton decides interpreter-or-compiler when a @triton.jit decorator runs (it reads
TRITON_INTERPRET then). So this file loads its own private copy of kernels/scaled_rotary.py
with TRITON_INTERPRET=1 set just for that import, and an autouse fixture sets it again (monkeypatch)
for each test here, because Triton also reads it lazily at launch: other tests in the same
pytest process (and the vLLM workers they spawn) never see the variable, and a copy of the
module imported elsewhere without interpret mode is left alone. Should a future Triton
fix the mode at `import triton` instead, the tests rerun this file in a subprocess.

vLLM is imported first, so Triton's own library is already built in compiled mode, as in
the full suite: Triton's @jit library helpers (tl.zeros, tl.cdiv, ...) then cannot run under
the interpreter, which is why the kernel calls only builtins (tl.full, not tl.zeros).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vllm  # noqa: F401  (imports Triton without TRITON_INTERPRET: see the module docstring)

from intp_vllm.vllm_ext.rotary import apply_scaled_rotary
from rotary_args import for_kernel

ROOT = Path(__file__).resolve().parents[1]
IN_SUBPROCESS = os.environ.get("INTP_ROTARY_TRITON_SUBPROCESS") == "1"


def _load_interpreted():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_intp_scaled_rotary_interpreted",
                                                      ROOT / "kernels" / "scaled_rotary.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


triton_kernel = _load_interpreted()
INTERPRETED = triton_kernel.HAS_TRITON and triton_kernel._interpreting()


@pytest.fixture(autouse=True)
def _interpret_while_testing(monkeypatch):
    """Triton also reads TRITON_INTERPRET lazily at launch; set it for this file's tests only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernel not interpreted here; ran in a subprocess")

BASE = 10000.0
ORIGINAL = 256
TYPES = ["none", "linear", "ntk", "yarn"]
CASES = [  # (head_size, rotary_dim, q_heads, k_heads): GQA, partial rotary, odd head counts, head_size 80
    (64, 64, 4, 2),
    (64, 32, 3, 1),
    (80, 48, 5, 5),
    (32, 32, 7, 3),
]


def make_qkv(tokens, head_size, q_heads, k_heads, dtype=torch.float32, seed=0):
    """q and k as strided views of one fused qkv row (as vLLM's Llama splits them)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, generator=g).to(dtype)
    q, k, _ = qkv.split([q_heads * head_size, k_heads * head_size, k_heads * head_size], dim=-1)
    return qkv, q, k


def batch(tokens=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 3000, (tokens,), generator=g)
    scales = torch.tensor([1.0, 2.0, 4.5, 8.0], dtype=torch.float32)[torch.randint(0, 4, (tokens,), generator=g)]
    return positions, scales


def fp32_atol(rope_type):
    # ntk: the kernel forms base' ** (2i/d) in fp64 and rounds once; torch's fp32 pow of a rounded base'
    # is up to ~4 ulp off, i.e. ~3000 * 4 * 2**-24 rad at these positions
    return 1e-3 if rope_type == "ntk" else 1e-5


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rope_type", TYPES)
def test_kernel_equals_torch_path_fp32_mixed_scales(rope_type, is_neox, case):
    head_size, rotary_dim, q_heads, k_heads = case
    positions, scales = batch()
    qkv, q, k = make_qkv(len(positions), head_size, q_heads, k_heads)
    kw = dict(head_size=head_size, rotary_dim=rotary_dim, is_neox=is_neox, rope_type=rope_type, base=BASE,
              original_max_position=ORIGINAL)
    expected_q, expected_k = apply_scaled_rotary(positions, q, k, scales, **kw)  # reference first: kernel is in place
    v_before = qkv[:, (q_heads + k_heads) * head_size:].clone()
    got_q, got_k = triton_kernel.scaled_rotary_(positions, q, k, scales, **for_kernel(kw))
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    atol = fp32_atol(rope_type)
    torch.testing.assert_close(q, expected_q, rtol=0, atol=atol)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=atol)
    assert torch.equal(qkv[:, (q_heads + k_heads) * head_size:], v_before)  # v untouched
    if rope_type != "none":  # negative control: the kernel does see each token's scale
        one_q, _ = apply_scaled_rotary(positions, *make_qkv(len(positions), head_size, q_heads, k_heads)[1:],
                                       torch.ones(len(positions)), **kw)
        assert (one_q - q).abs().max() > 1e-2


@needs_interpreter
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.usefixtures("vllm_config_here")
def test_scale_one_equals_vllm_rotary_embedding(is_neox):
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        plain = RotaryEmbedding(64, 48, 4096, BASE, is_neox, torch.float32)
    positions = torch.tensor([0, 1, 5, 100, 257, 3000, 4095])
    _, q, k = make_qkv(7, 64, 3, 1)
    expected_q, expected_k = plain.forward_native(positions, q.clone(), k.clone())
    for rope_type in TYPES:
        got_q, got_k = triton_kernel.scaled_rotary_(positions, q.clone(), k.clone(), torch.ones(7), head_size=64,
                                                    **for_kernel(dict(rotary_dim=48, is_neox=is_neox,
                                                                      rope_type=rope_type, base=BASE,
                                                                      original_max_position=ORIGINAL)))
        torch.testing.assert_close(got_q, expected_q, rtol=0, atol=2e-6)
        torch.testing.assert_close(got_k, expected_k, rtol=0, atol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rope_type", ["ntk", "yarn"])
def test_half_precision_within_one_rounding_of_the_fp32_math(rope_type, is_neox, dtype):
    positions, scales = batch(seed=3)
    _, q, k = make_qkv(len(positions), 64, 5, 1, dtype=dtype, seed=3)
    kw = dict(head_size=64, rotary_dim=48, is_neox=is_neox, rope_type=rope_type, base=BASE,
              original_max_position=ORIGINAL)
    expected_q, expected_k = apply_scaled_rotary(positions, q.float(), k.float(), scales, **kw)
    triton_kernel.scaled_rotary_(positions, q, k, scales, **for_kernel(kw))
    assert q.dtype == dtype
    # both round an fp32 result to the dtype once: one ulp at the largest magnitude, plus the ntk fp32 slack
    for got, expected in ((q, expected_q), (k, expected_k)):
        atol = torch.finfo(dtype).eps * expected.abs().max().item() + fp32_atol(rope_type)
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=atol)


@needs_interpreter
def test_key_none_int32_positions_one_scale_and_empty_batch():
    positions, _ = batch(tokens=5)
    scales = torch.full((5,), 3.0)
    _, q, _ = make_qkv(5, 64, 2, 1)
    kw = dict(head_size=64, rotary_dim=64, is_neox=True, rope_type="yarn", base=BASE, original_max_position=ORIGINAL)
    expected_q, _ = apply_scaled_rotary(positions, q, None, scales, **kw)
    got_q, got_k = triton_kernel.scaled_rotary_(positions.to(torch.int32), q, None, scales, **for_kernel(kw))
    assert got_k is None
    torch.testing.assert_close(got_q, expected_q, rtol=0, atol=1e-5)
    empty = torch.empty(0, 128)
    triton_kernel.scaled_rotary_(torch.empty(0, dtype=torch.long), empty, empty, torch.empty(0), **for_kernel(kw))


def test_kernel_module_imports_without_a_gpu():
    import intp_vllm_kernels.scaled_rotary as installed

    assert callable(installed.scaled_rotary_)
    if installed.HAS_TRITON and not installed._interpreting():
        _, q, k = make_qkv(2, 64, 1, 1)
        with pytest.raises(ValueError, match="query is on the CPU: the Triton kernel needs a GPU"):
            installed.scaled_rotary_(torch.arange(2), q, k, torch.ones(2), head_size=64, rotary_dim=64, is_neox=True,
                                     rope_type="none", base=BASE)


def _call(**overrides):
    _, q, k = make_qkv(4, 64, 2, 1)
    args = dict(positions=torch.arange(4), query=q, key=k, scales=torch.ones(4))
    kw = for_kernel(dict(head_size=64, rotary_dim=64, is_neox=True, rope_type="yarn", base=BASE,
                         original_max_position=ORIGINAL))
    for name, value in overrides.items():
        (args if name in args else kw)[name] = value
    return triton_kernel.scaled_rotary_(args["positions"], args["query"], args["key"], args["scales"], **kw)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(positions=torch.arange(4.0)), TypeError, "positions must be int32 or int64, got torch.float32"),
    (dict(positions=torch.arange(4)[None]), ValueError, r"positions must be 1-D \[num_tokens\]"),
    (dict(positions=[0, 1, 2, 3]), TypeError, "positions must be a torch.Tensor, got list"),
    (dict(scales=torch.ones(4, dtype=torch.float64)), TypeError, "scales must be float32, got torch.float64"),
    (dict(scales=torch.ones(3)), ValueError, r"scales must be 1-D of length num_tokens=4, got shape \(3,\)"),
    (dict(query=torch.ones(4, 128, dtype=torch.float64)), TypeError,
     "query dtype must be float32, float16 or bfloat16, got torch.float64"),
    (dict(key=torch.ones(4, 64, dtype=torch.float16)), TypeError, "key dtype torch.float16 differs from query"),
    (dict(query=torch.ones(4, 100)), ValueError, "query last dim 100 is not a multiple of head_size=64"),
    (dict(query=torch.ones(5, 128)), ValueError, r"query must be 2-D \[num_tokens=4, heads \* head_size\]"),
    (dict(key=torch.ones(128, 4).t()), ValueError, r"key last dim must be contiguous \(stride 1\)"),
    (dict(rotary_dim=63), ValueError, r"rotary_dim must be an even int in \[4, head_size=64\], got 63"),
    (dict(rotary_dim=128), ValueError, r"rotary_dim must be an even int in \[4, head_size=64\], got 128"),
    (dict(rope_type="llama3"), ValueError, "rope_type must be one of none, linear, ntk, yarn, got 'llama3'"),
    (dict(base=1.0), ValueError, "base must be a number > 1"),
    (dict(rope_type="yarn", yarn_ramp=(3.0, 3.0)), ValueError, r"yarn_ramp must be \(low, high\) frequency indices"),
    (dict(scales=torch.ones(4, device="meta")), ValueError,
     "all tensors must be on one device, got .*scales on meta"),
])
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.skipif(INTERPRETED or IN_SUBPROCESS or not triton_kernel.HAS_TRITON,
                    reason="the kernel is interpreted in this process")
def test_rerun_in_a_subprocess_with_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "INTP_ROTARY_TRITON_SUBPROCESS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
