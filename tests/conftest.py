"""Shared fixtures: tiny checkpoints and vLLM engines are built once per test session.

An engine takes 20-40 s to start on this CPU, so tests share them; each is sized
explicitly (the CPU backend would otherwise measure NUMA node 0 and grab most of RAM).
"""

from __future__ import annotations

import os

import pytest

from intp_vllm.vllm_ext.engine import shutdown_llm  # noqa: F401  (the tests' one way to stop an engine)

# Lets tests send a function to the spawned workers (collective_rpc) to inspect them.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ENGINE_KV_BYTES = 256 << 20


@pytest.fixture(scope="session")
def vllm_config_here():
    """Skips a test that builds a `VllmConfig` where vLLM's CPU platform refuses to (vLLM 0.34
    needs triton-cpu, which `make test-compat` cannot give it)."""
    from intp_vllm.vllm_ext.internals import VllmConfig

    try:
        VllmConfig()
    except RuntimeError as exc:
        pytest.skip(f"vLLM's CPU platform builds no config here: {exc}")


@pytest.fixture(scope="session")
def vllm_ops():
    """Skips a test that calls vLLM's compiled ops where they are not loaded (`make test-compat`
    runs a newer vLLM's Python code without them)."""
    import torch

    from intp_vllm.vllm_ext.internals import rotary_embedding  # noqa: F401  (loads vllm._C)

    if not hasattr(torch.ops._C, "rotary_embedding"):
        pytest.skip("vLLM's compiled ops are not loaded (make test-compat)")


def make_llm(model_dir, **kwargs):
    """A float32, eager, small-footprint engine for tests."""
    from vllm import LLM

    options = dict(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=ENGINE_KV_BYTES,
        max_num_seqs=8,
        seed=0,
        limit_mm_per_prompt={"video": 1},
    )
    options.update(kwargs)
    return LLM(**options)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from intp_vllm.research.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-video-llava"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir, tmp_path_factory):
    """The plain 8-frame engine (no INTP) with file:// access to a temp directory."""
    media_dir = tmp_path_factory.mktemp("media")
    llm = make_llm(tiny_model_dir, allowed_local_media_path=str(media_dir))
    llm.media_dir = media_dir
    yield llm
    shutdown_llm(llm)
