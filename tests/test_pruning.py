"""Video token pruning (vLLM's EVS and VidCom2) on INTP's tokens: counts, masks, HF parity.

A pruned 32-frame request through the engine equals an HF reference that applies the same
retention mask to HF's own video features (negative control: another mask disagrees); rate
0 is the unpruned output bit for bit; a batch mixing rates answers each request as alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from conftest import make_llm, shutdown_llm
from hf_reference import hf_generate, hf_pixel_values, load_hf_model, vllm_prompt_logprobs
from intp_vllm.core.rope_scaling import hf_rope_parameters
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.research.tiny_model import TinyModelSpec, make_tiny_model
from intp_vllm.vllm_ext.pruning import PRUNING_METHODS, VideoPruning

TOKENS_PER_FRAME = 17
TRAINED_CONTEXT = 192
PROMPT = "USER: <video>\nWhich colour came first? ASSISTANT:"
NEW_TOKENS = 12


# ------------------------------------------------------------------------------ counts and masks


@pytest.mark.parametrize("method", PRUNING_METHODS)
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.75, 0.875, 0.99])
@pytest.mark.parametrize("frames", [8, 32])
def test_the_mask_keeps_the_counted_tokens_and_every_cls(method, rate, frames):
    """Placeholders are sized before the video is encoded: the mask must keep exactly that many."""
    pruning = VideoPruning(method, rate)
    embeds = torch.randn(frames * TOKENS_PER_FRAME, 24, generator=torch.Generator().manual_seed(frames))
    mask = pruning.retention_mask(embeds, frames)
    assert mask.shape == (frames * TOKENS_PER_FRAME,) and mask.dtype == torch.bool
    assert int(mask.sum()) == pruning.kept_tokens(frames, TOKENS_PER_FRAME)
    assert mask.view(frames, TOKENS_PER_FRAME)[:, 0].all()  # each frame's CLS
    if rate == 0:
        assert mask.all()
    else:
        assert int(mask.sum()) < frames * TOKENS_PER_FRAME


def test_evs_keeps_the_first_frame_and_drops_what_repeats():
    """A still scene where frame 5 alone differs: EVS keeps frame 0 and the patches of frames 5
    and 6 (each unlike its predecessor), 3 frames' worth (rate 0.625 of 8), and drops the rest."""
    frames, patches = 8, TOKENS_PER_FRAME - 1
    embeds = torch.randn(1, TOKENS_PER_FRAME, 16).repeat(frames, 1, 1)
    embeds[5, 1:] = torch.randn(patches, 16)
    mask = VideoPruning("evs", 0.625).retention_mask(embeds.flatten(0, 1), frames).view(frames, TOKENS_PER_FRAME)
    assert mask[0].all() and mask[5:7, 1:].all()
    assert int(mask[[1, 2, 3, 4, 7], 1:].sum()) == 0


def test_the_kept_count_follows_vllm_s_formulas():
    """EVS keeps at least one frame of patches; VidCom2 at least one patch a frame (vLLM's
    `compute_retained_tokens_count`), each on top of the CLS tokens."""
    assert VideoPruning("evs", 0.75).kept_tokens(32, 257) == 32 + int(32 * 256 * 0.25)
    assert VideoPruning("evs", 0.99).kept_tokens(32, 257) == 32 + 256
    assert VideoPruning("vidcom2", 0.99).kept_tokens(32, 257) == 32 + max(32, int(32 * 256 * 0.01))
    assert VideoPruning("evs", 0.0).kept_tokens(32, 257) == 32 * 257


def _frame_encoder(hidden: int = 24, tokens: int = TOKENS_PER_FRAME):
    """A fixed per-frame encoder: clips (K, N, 3, H, W) -> (K, N, tokens, hidden), a random linear map."""
    weight = torch.randn(3 * 8 * 8, tokens * hidden, generator=torch.Generator().manual_seed(7))

    def encode(clips):
        return (clips.flatten(2) @ weight).unflatten(-1, (tokens, hidden))

    return encode


def _still_and_moving_frames(frames: int) -> torch.Tensor:
    """(frames, 3, 8, 8): random frames with runs of exact repeats (EVS scores 0 there: ties)."""
    pixels = torch.randn(frames, 3, 8, 8, generator=torch.Generator().manual_seed(frames))
    pixels[10:30] = pixels[10]
    pixels[frames - 9:] = pixels[frames - 9]
    return pixels


@pytest.mark.parametrize("method, rate", [("evs", 0.75), ("evs", 0.9375), ("vidcom2", 0.75)])
@pytest.mark.parametrize("grouping", ["interleaved", "consecutive"])
@pytest.mark.parametrize("chunk_frames", [8, 64])
@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "no-cls"])
def test_pruning_as_each_chunk_is_encoded_equals_pruning_all_at_once_bit_for_bit(method, rate, grouping,
                                                                                 chunk_frames, cls_token):
    """256 frames in INTP's 8-frame clips, encoded one clip or 64 frames at a time: the kept
    tokens equal the whole video's pruned at once (EVS's neighbours sit in other chunks when the
    clips interleave; repeated frames make ties, broken as vLLM's stable sort does)."""
    from intp_vllm.core.grouped_encoding import encode_in_groups, encoded_chunks

    frames, pixels, encoder = 256, _still_and_moving_frames(256), _frame_encoder()
    pruning = VideoPruning(method, rate)
    whole = encode_in_groups(pixels, encoder, 8, grouping)
    expected = whole[pruning.retention_mask(whole, frames, cls_token)]
    got = pruning.prune_chunks(encoded_chunks(pixels, encoder, 8, grouping, chunk_frames), frames, cls_token)
    assert got.shape == (pruning.kept_tokens(frames, TOKENS_PER_FRAME, cls_token), 24)
    assert torch.equal(got, expected)


def test_pruning_each_chunk_on_its_own_is_not_the_same():
    """Negative control for the test above: EVS applied to each 64-frame chunk of interleaved clips
    separately (neighbours in time taken from the chunk, each chunk keeping its share) keeps other tokens."""
    from intp_vllm.core.grouped_encoding import encode_in_groups, encoded_chunks

    frames, pixels, encoder = 256, _still_and_moving_frames(256), _frame_encoder()
    pruning = VideoPruning("evs", 0.75)
    whole = encode_in_groups(pixels, encoder, 8, "interleaved")
    expected = whole[pruning.retention_mask(whole, frames)]
    parts = []
    for index, tokens in encoded_chunks(pixels, encoder, 8, "interleaved", 64):
        order = torch.argsort(index)
        flat = tokens[order].flatten(0, 1)
        parts.append((index[order], flat[pruning.retention_mask(flat, len(index))].view(-1, 24)))
    assert sum(len(p) for _, p in parts) == len(expected)
    assert not torch.equal(torch.cat([p for _, p in parts]), expected)


@pytest.mark.parametrize("method, rate, message", [
    ("fastv", 0.5, "pruning_method 'fastv' is not one of evs, vidcom2"),
    ("evs", 1.0, r"pruning_rate 1.0: expected a number in \[0, 1\)"),
    ("evs", -0.1, r"pruning_rate -0.1: expected"),
    ("evs", "0.5", r"pruning_rate '0.5': expected"),
    ("evs", True, r"pruning_rate True: expected"),
])
def test_bad_pruning_is_refused_naming_the_field(method, rate, message):
    with pytest.raises(ValueError, match=message):
        VideoPruning(method, rate)


# ------------------------------------------------------------------------------ through the engine


def greedy(prompt_logprobs: int | None = 0) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=prompt_logprobs)


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
    spec = TinyModelSpec(max_position_embeddings=TRAINED_CONTEXT, seed=3)
    return make_tiny_model(tmp_path_factory.mktemp("pruning-short-context"), spec)


@pytest.fixture(scope="module")
def pruned_llm(short_context_dir):
    """32 frames, YaRN with each request's own scale, and vLLM's own --video-pruning-rate."""
    llm = make_llm(short_context_dir, video_pruning_rate=0.75, video_pruning_method="evs",
                   hf_overrides={"intp": {"frames": 32, "rope_type": "yarn"}})
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def drifting_video():
    """Shapes crossing a fixed background: redundant in time, as real video is."""
    return moving_shapes_video(num_frames=32, height=64, width=80, seed=5)


def request(video, **mm_kwargs) -> dict:
    prompt = {"prompt": PROMPT, "multi_modal_data": {"video": video}}
    return {**prompt, "mm_processor_kwargs": mm_kwargs} if mm_kwargs else prompt


def hf_at_request_scale(model_dir, prompt_tokens: int):
    """HF with the YaRN scale the engine chose for a request of `prompt_tokens` tokens."""
    from intp_vllm.core.request_scale import code_scale, request_scale_code

    scale = code_scale(request_scale_code(prompt_tokens, TRAINED_CONTEXT))
    params = hf_rope_parameters("yarn", base=10000.0, rotary_dim=32, factor=scale,
                                original_max_position=TRAINED_CONTEXT)
    return load_hf_model(str(model_dir), json.dumps(params)) if scale > 1 else load_hf_model(str(model_dir))


@pytest.mark.engine
@pytest.mark.parametrize("pruning", [VideoPruning("evs", 0.75), VideoPruning("vidcom2", 0.5)], ids=["evs", "vidcom2"])
def test_pruned_request_matches_hf_with_the_same_mask(pruned_llm, short_context_dir, drifting_video, pruning):
    """The server's EVS at 0.75, and VidCom2 at 0.5 asked for per request: the kept tokens, their
    order, the RoPE scale of the shorter prompt and the answer equal HF's with the same mask."""
    kwargs = {} if pruning.method == "evs" else {"pruning_method": pruning.method, "pruning_rate": pruning.rate}
    output = pruned_llm.generate(request(drifting_video, **kwargs), greedy(), use_tqdm=False)[0]
    video_token = pruned_llm.llm_engine.model_config.hf_config.video_token_index
    assert output.prompt_token_ids.count(video_token) == pruning.kept_tokens(32, TOKENS_PER_FRAME)
    model = hf_at_request_scale(short_context_dir, len(output.prompt_token_ids))
    pixels = hf_pixel_values(drifting_video, 56)
    tokens, logprobs = hf_generate(model, output.prompt_token_ids, pixels, NEW_TOKENS, pruning)
    assert list(output.outputs[0].token_ids) == tokens
    np.testing.assert_allclose(vllm_prompt_logprobs(output), logprobs, atol=2e-3, rtol=0)

    # Negative control: the other method's mask keeps another set of as many tokens.
    other = VideoPruning(next(m for m in PRUNING_METHODS if m != pruning.method), pruning.rate)
    _, other_logprobs = hf_generate(model, output.prompt_token_ids, pixels, NEW_TOKENS,
                                    _same_count(other, pruning))
    assert not np.allclose(other_logprobs, logprobs, atol=2e-3)


def _same_count(other: VideoPruning, pruning: VideoPruning) -> VideoPruning:
    """`other`'s method at the rate that keeps as many tokens as `pruning` (the prompt is fixed)."""
    for rate in np.linspace(0.01, 0.99, 9801):
        candidate = VideoPruning(other.method, float(rate))
        if candidate.kept_tokens(32, TOKENS_PER_FRAME) == pruning.kept_tokens(32, TOKENS_PER_FRAME):
            return candidate
    raise AssertionError("no rate of the other method keeps as many tokens")


@pytest.mark.engine
def test_rate_zero_is_the_unpruned_output_bit_for_bit(tiny_llm):
    video = moving_shapes_video(num_frames=8, height=64, width=80, seed=8)
    plain = tiny_llm.generate(request(video), greedy(), use_tqdm=False)[0]
    zero = tiny_llm.generate(request(video, pruning_rate=0.0), greedy(), use_tqdm=False)[0]
    assert zero.prompt_token_ids == plain.prompt_token_ids
    assert list(zero.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    assert np.array_equal(vllm_prompt_logprobs(zero), vllm_prompt_logprobs(plain))


@pytest.mark.engine
def test_a_batch_mixing_rates_answers_each_as_alone(pruned_llm, drifting_video):
    requests = [request(drifting_video), request(drifting_video, pruning_rate=0.0),
                request(drifting_video[::-1].copy(), pruning_method="vidcom2", pruning_rate=0.875)]
    together = pruned_llm.generate(requests, greedy(None), use_tqdm=False)
    alone = [pruned_llm.generate(r, greedy(None), use_tqdm=False)[0] for r in requests]
    for mixed, single in zip(together, alone):
        assert mixed.prompt_token_ids == single.prompt_token_ids
        assert list(mixed.outputs[0].token_ids) == list(single.outputs[0].token_ids)
    lengths = [len(o.prompt_token_ids) for o in together]
    assert lengths[1] > lengths[0] > lengths[2]  # rate 0 keeps all; 0.875 keeps least


@pytest.mark.engine
def test_bad_request_pruning_is_refused(pruned_llm, drifting_video):
    with pytest.raises(ValueError, match="mm_processor_kwargs.pruning_method 'fastv' is not one of evs, vidcom2"):
        pruned_llm.generate(request(drifting_video, pruning_method="fastv"), greedy(None), use_tqdm=False)
    with pytest.raises(ValueError, match=r"mm_processor_kwargs.pruning_rate 1.5: expected a number in \[0, 1\)"):
        pruned_llm.generate(request(drifting_video, pruning_rate=1.5), greedy(None), use_tqdm=False)
