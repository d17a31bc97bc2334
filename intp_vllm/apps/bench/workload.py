"""The benchmark's requests and the checkpoints it generates: a mix of video lengths and output
lengths, with new videos every round."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from intp_vllm.research.tiny_model import TinyModelSpec

QUESTIONS = (
    "What is happening in this video?",
    "Describe the video in detail.",
    "Which colour came first?",
    "How many objects are there?",
)

SMALL_SPEC = TinyModelSpec(
    image_size=112,
    vision_hidden=768,
    vision_layers=4,
    vision_heads=12,
    text_hidden=768,
    text_layers=6,
    text_heads=12,
    text_kv_heads=12,
    text_intermediate=2048,
    max_position_embeddings=1024,
    weight_std=0.02,
)
"""The default checkpoint: 768-wide 6-layer Llama, 4-layer CLIP at 112 px (65 tokens a frame).
Its trained context (1024) holds 8 frames and a question, so 16 and 32 frames need RoPE scaling."""

QUICK_SPEC = TinyModelSpec(max_position_embeddings=256)
"""The tiny test checkpoint (17 tokens a frame) with a context that 16 frames overflow."""

GENERATED_ROPE_LINEAR = 2.0
"""The generated LLaVA-NeXT-Video checkpoints carry linear RoPE x2, as LLaVA-NeXT-Video-7B-hf's does."""
SMALL_LLAVA_NEXT_VIDEO_SPEC = replace(SMALL_SPEC, max_position_embeddings=320)
"""SMALL_SPEC as a LLaVA-NeXT-Video (2x2 pooling: 16 tokens a frame at 112 px) whose trained
context 2 x 320 holds 32 frames and a question, as the 7B's 2 x 4096 holds 32 frames of 144:
64 frames need RoPE scaling (about 1.6)."""
QUICK_LLAVA_NEXT_VIDEO_SPEC = TinyModelSpec(image_size=112, max_position_embeddings=96)
"""A tiny LLaVA-NeXT-Video (16 tokens a frame) whose trained context 2 x 96 16 frames overflow."""
ARCHITECTURES = ("video-llava", "llava-next-video")
"""What `intp-vllm bench` generates a checkpoint of when it is given none."""


def generated_spec(architecture: str, quick: bool) -> TinyModelSpec:
    """The shapes of the checkpoint `generate_checkpoint` writes."""
    if architecture == "llava-next-video":
        return QUICK_LLAVA_NEXT_VIDEO_SPEC if quick else SMALL_LLAVA_NEXT_VIDEO_SPEC
    return QUICK_SPEC if quick else SMALL_SPEC


def generate_checkpoint(architecture: str, quick: bool, path: Path) -> Path:
    """Write the benchmark's random checkpoint of `architecture` (one of ARCHITECTURES; LLaVA-NeXT-Video
    with linear RoPE x2) to `path`: the tiny test one with `quick`, else the small one. Returns `path`."""
    from intp_vllm.research.tiny_model import make_tiny_llava_next_video, make_tiny_model

    spec = generated_spec(architecture, quick)
    if architecture == "llava-next-video":
        return make_tiny_llava_next_video(path, spec, rope_linear=GENERATED_ROPE_LINEAR)
    return make_tiny_model(path, spec)


@dataclass(frozen=True)
class Request:
    frames: int
    max_tokens: int
    question: str
    seed: int


def make_workload(count: int, frames: tuple[int, ...], new_tokens: tuple[int, ...], round_index: int) -> list[Request]:
    """`count` requests cycling through every (frames, new tokens) pair; each round gets new videos
    (new seeds), so neither vLLM's prefix cache nor its multimodal cache can serve a repeat."""
    return [
        Request(frames=frames[i % len(frames)],
                max_tokens=new_tokens[(i // len(frames)) % len(new_tokens)],
                question=QUESTIONS[i % len(QUESTIONS)],
                seed=round_index * 100_003 + i)
        for i in range(count)
    ]


def make_video(request: Request):
    from intp_vllm.research.synthetic import moving_shapes_video

    return moving_shapes_video(request.frames, seed=request.seed)
