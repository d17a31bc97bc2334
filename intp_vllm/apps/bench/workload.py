"""The benchmark's requests and the checkpoints it generates: a mix of video lengths and output
lengths, with new videos every round."""

from __future__ import annotations

from dataclasses import dataclass

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
