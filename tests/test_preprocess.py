"""Pillow CLIP preprocessing against HF's CLIPImageProcessor (its Pillow backend, which is what
transformers runs without torchvision): equal bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from intp_vllm.video.preprocess import MAX_ASPECT_RATIO, ClipPreprocessConfig, preprocess_frames, resize_and_crop
from intp_vllm.research.synthetic import moving_shapes_video

SIZES = [(240, 320), (320, 240), (100, 150), (224, 224), (37, 500), (719, 1283), (1080, 1920), (4, 800)]


def textured_frames(height: int, width: int, seed: int) -> np.ndarray:
    """Shapes with hard edges plus noise: where resamplers disagree most."""
    rng = np.random.default_rng(seed)
    shapes = moving_shapes_video(num_frames=2, height=max(height, 16), width=max(width, 16), seed=seed % 1000)
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
    np.testing.assert_array_equal(ours, expected)


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


def test_resizing_straight_into_the_crop_box_would_not_be_exact():
    """Negative control for the resize-then-crop order: Pillow's resize(box=...) into the crop
    differs from HF by whole uint8 levels."""
    from PIL import Image

    frame = textured_frames(480, 640, seed=5)[0]
    config = ClipPreprocessConfig()
    scale = 480 / 224
    left = (298 - 224) // 2 * scale
    boxed = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BICUBIC,
                                                     box=(left, 0, left + 224 * scale, 480)))
    exact = resize_and_crop(frame, config)
    assert np.abs(boxed.astype(int) - exact.astype(int)).max() >= 1


def test_aspect_ratio_limit_is_inclusive_and_named():
    config = ClipPreprocessConfig(shortest_edge=8, crop_size=8)
    assert resize_and_crop(np.zeros((2, 2 * MAX_ASPECT_RATIO, 3), np.uint8), config).shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"a frame has 402x2 frames \(aspect ratio 201:1\); at most 200:1"):
        resize_and_crop(np.zeros((2, 2 * MAX_ASPECT_RATIO + 2, 3), np.uint8), config)


@pytest.mark.parametrize("kwargs, message", [
    ({"shortest_edge": 0}, "shortest_edge must be a positive integer, got 0"),
    ({"crop_size": 2.5}, "crop_size must be a positive integer, got 2.5"),
    ({"shortest_edge": 100, "crop_size": 224}, "crop_size 224 is larger than shortest_edge 100"),
])
def test_bad_preprocessing_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipPreprocessConfig(**kwargs)
