"""numpy CLIP preprocessing against HF's CLIPImageProcessor (PIL), the numeric reference."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from intp_vllm.preprocess import ClipPreprocessConfig, preprocess_frames
from intp_vllm.synthetic import moving_shapes_video

SIZES = [(240, 320), (320, 240), (100, 150), (224, 224), (37, 500), (719, 1283)]


def textured_frames(height: int, width: int, seed: int) -> np.ndarray:
    """Shapes with hard edges plus noise: where resamplers disagree most."""
    rng = np.random.default_rng(seed)
    shapes = moving_shapes_video(num_frames=2, height=max(height, 16), width=max(width, 16), seed=seed)
    shapes = shapes[:, :height, :width]
    noise = rng.integers(-40, 40, size=shapes.shape)
    return np.clip(shapes.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("size", [224, 56])
def test_matches_clip_image_processor(height, width, size):
    frames = textured_frames(height, width, seed=height + width)
    reference = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    expected = reference(images=list(frames), return_tensors="np")["pixel_values"]
    ours = preprocess_frames(frames, ClipPreprocessConfig(shortest_edge=size, crop_size=size))
    assert ours.shape == expected.shape == (2, 3, size, size)
    assert ours.dtype == np.float32
    # Resize is bit-exact with Pillow; the residue is float32 rounding in rescale + normalise.
    assert np.abs(ours - expected).max() <= 1e-5


def test_plain_cv2_bicubic_would_not_be_close_enough():
    """Negative control: OpenCV's bicubic (no antialiasing) misses the 1e-2 bound by far."""
    import cv2

    frames = textured_frames(480, 640, seed=3)
    config = ClipPreprocessConfig()
    reference = CLIPImageProcessorPil()(images=list(frames), return_tensors="np")["pixel_values"]
    resized = np.stack([cv2.resize(f, (298, 224), interpolation=cv2.INTER_CUBIC) for f in frames])
    cropped = resized[:, :, 37:261].astype(np.float32) / 255
    naive = ((cropped - np.array(config.mean, np.float32)) / np.array(config.std, np.float32)).transpose(0, 3, 1, 2)
    assert np.abs(naive - reference).max() > 1e-2
