"""256-1024 frames through the engine: vLLM's budgets sized from --max-frames and the server's
pruning, so a 1024-frame request is admitted (vllm_ext/model.py `max_video_tokens`)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from intp_vllm.core.config import TEXT_MARGIN_TOKENS
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.vllm_ext.pruning import VideoPruning

FRAMES = 1024
TOKENS_PER_FRAME = 17  # the tiny checkpoint: 56 px, 14 px patches, CLS
PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"


@pytest.fixture(scope="module")
def long_video():
    return moving_shapes_video(num_frames=FRAMES, height=56, width=56, seed=11)


def request(video, **mm_kwargs) -> dict:
    return {"prompt": PROMPT, "multi_modal_data": {"video": video}, "mm_processor_kwargs": mm_kwargs}


@pytest.mark.engine
@pytest.mark.parametrize("server_rate", [0.0, 0.75], ids=["unpruned", "server-pruning-0.75"])
def test_a_1024_frame_request_is_admitted_and_the_budget_follows_the_kept_tokens(tiny_model_dir, long_video,
                                                                                 server_rate):
    """--max-frames 1024 alone: max_model_len and vLLM's encoder cache hold one 1024-frame video
    (17,408 tokens), which is admitted. With the server's
    --video-pruning-rate 0.75 both hold the kept tokens only (5,120), a 1024-frame video at that
    rate is admitted and one asking for no pruning is refused naming the fields, while a request
    at the default count (8) may still turn pruning off."""
    pruning = {"video_pruning_rate": server_rate} if server_rate else {}
    llm = make_llm(tiny_model_dir, hf_overrides={"intp": {"max_frames": FRAMES}}, max_num_seqs=1, **pruning)
    try:
        budget = VideoPruning("evs", server_rate).kept_tokens(FRAMES, TOKENS_PER_FRAME)
        assert budget == (FRAMES * TOKENS_PER_FRAME if not server_rate else FRAMES + FRAMES * 16 // 4)
        assert llm.llm_engine.model_config.max_model_len == budget + TEXT_MARGIN_TOKENS
        assert llm.llm_engine.input_processor.mm_encoder_cache_size == budget  # above max_num_batched_tokens (4096)
        video_token = llm.llm_engine.model_config.hf_config.video_token_index
        greedy = SamplingParams(temperature=0.0, max_tokens=1)
        output = llm.generate(request(long_video, frames=FRAMES), greedy, use_tqdm=False)[0]
        assert output.prompt_token_ids.count(video_token) == budget and len(output.outputs[0].token_ids) == 1
        if server_rate:
            with pytest.raises(ValueError, match=r"1024 frames at mm_processor_kwargs.pruning_rate=0 \(evs\) take "
                                                 r"17408 video tokens; this server holds at most 5120 a video "
                                                 r"\(--max-frames 1024 at --video-pruning-rate 0.75\)"):
                llm.generate(request(long_video, frames=FRAMES, pruning_rate=0.0), greedy, use_tqdm=False)
            short = llm.generate(request(long_video[:8], pruning_rate=0.0), greedy, use_tqdm=False)[0]
            assert short.prompt_token_ids.count(video_token) == 8 * TOKENS_PER_FRAME
    finally:
        shutdown_llm(llm)
