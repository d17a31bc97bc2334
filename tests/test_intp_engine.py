"""INTP through the real engine: 32 frames against an HF reference with the same RoPE; 8-128 frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.core.rope_scaling import hf_rope_parameters
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.research.tiny_model import TinyModelSpec, make_tiny_model
from intp_vllm.video.io import write_video

pytestmark = pytest.mark.engine

TRAINED_CONTEXT = 192  # 8 frames x 17 tokens + the question fit; 32 frames do not
FACTOR = 4.0
PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"
NEW_TOKENS = 16
TOKENS_PER_FRAME = 17


def greedy(max_tokens: int = NEW_TOKENS, prompt_logprobs: int | None = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)


def greedy_with_logprobs(max_tokens: int) -> SamplingParams:
    """Greedy, with each sampled token's logprob (prompt logprobs would turn prefix caching off)."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
    spec = TinyModelSpec(max_position_embeddings=TRAINED_CONTEXT, seed=3)
    return make_tiny_model(tmp_path_factory.mktemp("short-context"), spec)


@pytest.fixture(scope="module")
def video32():
    return moving_shapes_video(num_frames=32, height=64, width=80, seed=5)


def hf_reference(model_dir, rope_type: str, factor: float):
    params = hf_rope_parameters(rope_type, base=10000.0, rotary_dim=32, factor=factor,
                                original_max_position=TRAINED_CONTEXT)
    return load_hf_model(str(model_dir), json.dumps(params))


@pytest.mark.parametrize("rope_type", ["ntk", "linear", "yarn"])
def test_32_frames_match_hf_with_same_scaled_rope(short_context_dir, video32, rope_type):
    llm = make_llm(short_context_dir, hf_overrides={"intp": {"frames": 32, "rope_type": rope_type, "factor": FACTOR}})
    try:
        output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": video32}}, greedy(), use_tqdm=False)[0]
    finally:
        shutdown_llm(llm)
    assert len(output.prompt_token_ids) > TRAINED_CONTEXT  # the scaled positions are really used
    pixels = hf_pixel_values(video32, 56)  # frames in time order: the tower is per-frame
    tokens, logprobs = hf_generate(hf_reference(short_context_dir, rope_type, FACTOR), output.prompt_token_ids,
                                   pixels, NEW_TOKENS)
    assert list(output.outputs[0].token_ids) == tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)

    # Negative control: the reference at another factor must disagree.
    wrong, _ = hf_generate(hf_reference(short_context_dir, rope_type, FACTOR / 2), output.prompt_token_ids,
                           pixels, NEW_TOKENS)
    assert wrong != tokens


@pytest.fixture(scope="module")
def long_llm(short_context_dir, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("long-media")
    llm = make_llm(short_context_dir, allowed_local_media_path=str(media_dir),
                   hf_overrides={"intp": {"frames": 128, "rope_type": "yarn"}})
    llm.media_dir = media_dir
    yield llm
    shutdown_llm(llm)


@pytest.mark.parametrize("frames", [8, 16, 32, 64, 128])
def test_frame_counts_run_as_arrays_and_files(long_llm, frames):
    video = moving_shapes_video(num_frames=frames, height=48, width=64, seed=frames)
    path = write_video(long_llm.media_dir / f"v{frames}.mp4", video)
    from_array = long_llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": video}},
                                   greedy(4, None), use_tqdm=False)[0]
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                             {"type": "text", "text": "Which colour came first?"}]}]
    from_file = long_llm.chat(messages, greedy(4, None), use_tqdm=False)[0]
    video_token = long_llm.llm_engine.model_config.hf_config.video_token_index
    for output in (from_array, from_file):
        assert output.prompt_token_ids.count(video_token) == frames * TOKENS_PER_FRAME
        assert len(output.outputs[0].token_ids) == 4


def test_longer_file_is_sampled_down_to_configured_frames(long_llm):
    path = write_video(long_llm.media_dir / "long.mp4", moving_shapes_video(num_frames=300, height=32, width=32))
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                             {"type": "text", "text": "What happened?"}]}]
    output = long_llm.chat(messages, greedy(2, None), use_tqdm=False)[0]
    video_token = long_llm.llm_engine.model_config.hf_config.video_token_index
    assert output.prompt_token_ids.count(video_token) == 128 * TOKENS_PER_FRAME


def request(video, prompt=PROMPT):
    return {"prompt": prompt, "multi_modal_data": {"video": video}}


def test_per_request_scale_matches_hf_at_that_scale(long_llm, short_context_dir):
    """factor "auto": a 64-frame request runs at the scale its length needs, as HF does at that scale."""
    from intp_vllm.core.request_scale import code_scale, request_scale_code

    video = moving_shapes_video(num_frames=64, height=48, width=64, seed=11)
    output = long_llm.generate(request(video), greedy(), use_tqdm=False)[0]
    scale = code_scale(request_scale_code(len(output.prompt_token_ids), TRAINED_CONTEXT))
    assert scale > 4
    pixels = hf_pixel_values(video, 56)
    tokens, logprobs = hf_generate(hf_reference(short_context_dir, "yarn", scale), output.prompt_token_ids,
                                   pixels, NEW_TOKENS)
    assert list(output.outputs[0].token_ids) == tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)
    unscaled, _ = hf_generate(hf_reference(short_context_dir, "yarn", 1.0), output.prompt_token_ids, pixels, NEW_TOKENS)
    assert unscaled != tokens  # negative control


def test_short_request_runs_the_original_model_in_a_mixed_batch(long_llm, short_context_dir):
    """An 8-frame request keeps s = 1 (plain RoPE) even beside a 64-frame one; batch-mates change nothing."""
    short = moving_shapes_video(num_frames=8, height=48, width=64, seed=12)
    long = moving_shapes_video(num_frames=64, height=48, width=64, seed=13)
    alone_short = long_llm.generate(request(short), greedy(), use_tqdm=False)[0]
    alone_long = long_llm.generate(request(long), greedy(), use_tqdm=False)[0]
    together = long_llm.generate([request(short), request(long)], greedy(), use_tqdm=False)
    assert together[0].outputs[0].token_ids == alone_short.outputs[0].token_ids
    assert together[1].outputs[0].token_ids == alone_long.outputs[0].token_ids

    plain, _ = hf_generate(hf_reference(short_context_dir, "none", 1.0), alone_short.prompt_token_ids,
                           hf_pixel_values(short, 56), NEW_TOKENS)
    assert list(alone_short.outputs[0].token_ids) == plain


SHARED_PREFIX = "USER: " + " ".join(["the red circle moves left and the blue square stays still"] * 14)


def test_prefix_cache_is_not_shared_across_scales(long_llm, short_context_dir):
    """Two requests share a 150-token text prefix but need different scales: no KV reuse between
    them, with or without a client's own cache_salt, and none from a text-only request whose
    client salt names a scale's."""
    from intp_vllm.core.request_scale import request_scale_code, scale_cache_salt

    small = request(moving_shapes_video(num_frames=8, height=48, width=64, seed=14),
                    SHARED_PREFIX + " <video>\nWhat happened? ASSISTANT:")
    large = request(moving_shapes_video(num_frames=64, height=48, width=64, seed=15),
                    SHARED_PREFIX + " <video>\nWhat happened? ASSISTANT:")
    first = long_llm.generate(small, greedy(8, None), use_tqdm=False)[0]
    second = long_llm.generate(large, greedy(8, None), use_tqdm=False)[0]
    again = long_llm.generate(large, greedy(8, None), use_tqdm=False)[0]
    assert second.num_cached_tokens == 0  # the small request's prefix blocks were not reused
    assert again.num_cached_tokens >= 128  # prefix caching is on and works within one scale
    assert again.outputs[0].token_ids == second.outputs[0].token_ids

    # A client's own salt joins the scale's instead of replacing it.
    salted = [long_llm.generate({**r, "cache_salt": "tenant-a"}, greedy_with_logprobs(8), use_tqdm=False)[0]
              for r in (small, large, large)]
    assert salted[1].num_cached_tokens == 0 and salted[2].num_cached_tokens >= 128

    # Nor can a text-only request seed the large request's blocks by naming its scale's salt.
    long_llm.reset_prefix_cache()
    forged = scale_cache_salt(request_scale_code(len(second.prompt_token_ids), TRAINED_CONTEXT))
    seeded = long_llm.generate({"prompt": SHARED_PREFIX, "cache_salt": forged}, greedy(1, None), use_tqdm=False)[0]
    assert seeded.prompt_token_ids[:128] == second.prompt_token_ids[:128]
    after_seed = long_llm.generate(large, greedy(8, None), use_tqdm=False)[0]
    assert after_seed.num_cached_tokens == 0

    no_cache = make_llm(short_context_dir, enable_prefix_caching=False,
                        hf_overrides={"intp": {"frames": 128, "rope_type": "yarn"}})
    try:
        reference = no_cache.generate([small, large], greedy(8, None), use_tqdm=False)
    finally:
        shutdown_llm(no_cache)
    assert first.outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert second.outputs[0].token_ids == reference[1].outputs[0].token_ids
    for output, alone in zip(salted, [reference[0], reference[1], reference[1]]):
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids
    assert after_seed.outputs[0].token_ids == reference[1].outputs[0].token_ids


def sampled_logprobs(output) -> list[float]:
    return [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]


# A prefix-cache hit attends over cached and new blocks in another summation order than a full
# prefill: the same computation up to float32 rounding (~1e-6 seen), far below what a different
# scale or other frames change.
LOGPROB_ATOL = 1e-5


def logprob_gap(a, b) -> float:
    """Largest difference between two outputs' sampled-token logprobs."""
    return float(np.max(np.abs(np.subtract(sampled_logprobs(a), sampled_logprobs(b)))))


def collapse_video(llm, token_ids: list[int]) -> list[int]:
    """A processed prompt with its video tokens folded back into the one placeholder."""
    video_token = llm.llm_engine.model_config.hf_config.video_token_index
    start = token_ids.index(video_token)
    return token_ids[:start + 1] + [t for t in token_ids[start:] if t != video_token]


def test_truncated_prompt_runs_at_the_scale_its_salt_names(long_llm):
    """truncate_prompt_tokens shortens a prompt after the processor decided its scale: the
    worker uses that scale, so a request that shares the salt and the truncated prefix reuses
    its KV and answers exactly as it does alone."""
    from intp_vllm.core.request_scale import request_scale_code

    video = moving_shapes_video(num_frames=64, height=48, width=64, seed=16)
    prompt = {"prompt": SHARED_PREFIX + " <video>\nWhat happened? ASSISTANT:", "multi_modal_data": {"video": video}}
    full_length = len(long_llm.generate(prompt, greedy(1, None), use_tqdm=False)[0].prompt_token_ids)
    long_llm.reset_prefix_cache()
    truncated = long_llm.generate(prompt, greedy(4, None), use_tqdm=False,
                                  tokenization_kwargs={"truncate_prompt_tokens": full_length - 100,
                                                       "truncation_side": "left"})[0]
    kept = list(truncated.prompt_token_ids)
    assert len(kept) == full_length - 100
    assert request_scale_code(len(kept), TRAINED_CONTEXT) < request_scale_code(full_length, TRAINED_CONTEXT)

    # The kept tokens (video collapsed to its placeholder) padded back to the full length:
    # the same scale, so the same salt, and the truncated request's blocks as its prefix.
    pad = long_llm.get_tokenizer().encode(" still", add_special_tokens=False)[-1]
    sharer = {"prompt_token_ids": collapse_video(long_llm, kept) + [pad] * 100, "multi_modal_data": {"video": video}}
    reused = long_llm.generate(sharer, greedy_with_logprobs(4), use_tqdm=False)[0]
    long_llm.reset_prefix_cache()
    alone = long_llm.generate(sharer, greedy_with_logprobs(4), use_tqdm=False)[0]
    block = long_llm.llm_engine.vllm_config.cache_config.block_size
    assert reused.num_cached_tokens > len(kept) - block and alone.num_cached_tokens == 0
    assert reused.outputs[0].token_ids == alone.outputs[0].token_ids
    assert logprob_gap(reused, alone) < LOGPROB_ATOL


def test_chat_video_is_decoded_at_the_request_frames(long_llm):
    """LLM.chat with mm_processor_kwargs.frames decodes the file at that count, once: the same
    frames as read_video at that count; not a sample of the engine's default decode."""
    from intp_vllm.core.rearrange import uniform_frame_indices
    from intp_vllm.video.io import read_video

    path = write_video(long_llm.media_dir / "long300.mp4", moving_shapes_video(num_frames=300, height=48, width=64,
                                                                                seed=17), gop=60, b_frames=2)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                             {"type": "text", "text": "What happened?"}]}]
    chat = long_llm.chat(messages, greedy_with_logprobs(4), use_tqdm=False, mm_processor_kwargs={"frames": 16})[0]
    prompt_ids = collapse_video(long_llm, list(chat.prompt_token_ids))

    def from_array(video):
        return long_llm.generate({"prompt_token_ids": prompt_ids, "multi_modal_data": {"video": video},
                                  "mm_processor_kwargs": {"frames": 16}}, greedy_with_logprobs(4), use_tqdm=False)[0]

    as_array = from_array(read_video(path, 16))
    assert chat.prompt_token_ids == as_array.prompt_token_ids
    assert chat.outputs[0].token_ids == as_array.outputs[0].token_ids
    assert logprob_gap(chat, as_array) < LOGPROB_ATOL
    sampled_twice = from_array(read_video(path, 128)[uniform_frame_indices(128, 16)])  # negative control
    assert logprob_gap(sampled_twice, chat) > LOGPROB_ATOL


@pytest.fixture(scope="module")
def long_file(long_llm):
    """300 frames at 8 fps: 37.5 s."""
    return write_video(long_llm.media_dir / "long300-range.mp4",
                       moving_shapes_video(num_frames=300, height=48, width=64, seed=23), gop=40, b_frames=2)


def chat_video(llm, url: str, mm_processor_kwargs=None):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happened?"}]}]
    return llm.chat(messages, greedy_with_logprobs(4), use_tqdm=False, mm_processor_kwargs=mm_processor_kwargs)[0]


def test_chat_video_by_time_range_and_rate_decodes_those_frames(long_llm, long_file):
    """A #t= fragment, start/end and fps are decided once by the processor and decoded by the loader:
    the same frames as read_video with that range and rate, handed over as an array."""
    from intp_vllm.video.io import read_video

    def same_as_array(chat, video, frames):
        prompt_ids = collapse_video(long_llm, list(chat.prompt_token_ids))
        as_array = long_llm.generate({"prompt_token_ids": prompt_ids, "multi_modal_data": {"video": video},
                                      "mm_processor_kwargs": {"frames": frames}}, greedy_with_logprobs(4),
                                     use_tqdm=False)[0]
        assert chat.prompt_token_ids == as_array.prompt_token_ids
        return logprob_gap(chat, as_array)

    video_token = long_llm.llm_engine.model_config.hf_config.video_token_index
    fragment = chat_video(long_llm, f"file://{long_file}#t=10,0:20", {"frames": 16})
    in_range = read_video(long_file, 16, start=10, end=20)
    assert same_as_array(fragment, in_range, 16) < LOGPROB_ATOL
    assert same_as_array(fragment, read_video(long_file, 16), 16) > LOGPROB_ATOL  # the whole video: not it
    by_kwargs = chat_video(long_llm, f"file://{long_file}", {"frames": 16, "start": 10, "end": "0:20"})
    assert by_kwargs.outputs[0].token_ids == fragment.outputs[0].token_ids and logprob_gap(by_kwargs, fragment) == 0

    at_rate = chat_video(long_llm, f"file://{long_file}", {"fps": 1})  # 37.5 s at 1 fps: 38 frames, padded to 40
    assert at_rate.prompt_token_ids.count(video_token) == 40 * TOKENS_PER_FRAME
    assert same_as_array(at_rate, read_video(long_file, 128, fps=1), 128) < LOGPROB_ATOL
    capped = chat_video(long_llm, f"file://{long_file}#t=5", {"fps": 30})  # 32.5 s x 30 fps: capped at 128
    assert capped.prompt_token_ids.count(video_token) == 128 * TOKENS_PER_FRAME


@pytest.mark.parametrize("url_tail, kwargs, message", [
    ("#t=10,20", {"start": 5}, r"video_url #t= time range and mm_processor_kwargs start conflict"),
    ("", {"frames": 16, "fps": 1}, r"mm_processor_kwargs.frames=16 and mm_processor_kwargs.fps=1 conflict"),
    ("", {"fps": -2}, r"mm_processor_kwargs.fps=-2: expected frames a second of video"),
    ("#t=20,10", None, r"the end \(10 s\) must be after the start \(20 s\)"),
    ("", {"start": 40}, r"start=40 s is at or past the end of .* \(37.5 s long\)"),
])
def test_conflicting_or_out_of_range_rate_and_range_are_refused(long_llm, long_file, url_tail, kwargs, message):
    with pytest.raises(ValueError, match=message):
        chat_video(long_llm, f"file://{long_file}{url_tail}", kwargs)
