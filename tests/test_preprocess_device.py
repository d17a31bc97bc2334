"""The opt-in torch preprocessing path (`preprocess_device`, run here on "cpu") against the exact
Pillow path: within one uint8 level, in a tiny fraction of values, on real decoded frames; each
bound has a negative control that breaks it; the setting's errors name the key and the values
allowed. The exact path's parity with HF is tests/test_preprocess.py's."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from intp_vllm.core.config import IntpConfig
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import read_video, write_video
from intp_vllm.video.preprocess import ClipPreprocessConfig, preprocess_frames, resize_and_crop, shortest_edge_size

MAX_LEVELS = 1
"""Largest difference from the Pillow path, in uint8 levels, on camera-like frames (measured: 1)."""
MAX_LEVELS_NOISE = 2
"""The same on uniform noise (measured: 2 where a 37x500 strip is upscaled 6x, 1 elsewhere)."""
MEAN_LEVELS = 2e-3
"""Largest mean absolute difference, in uint8 levels (measured: 3e-5 to 1.6e-4 on decoded frames,
up to 1.3e-3 on small frames of uniform noise: one value in a thousand or fewer is off)."""
NORMALISED_LEVEL = 1 / 255 / min(ClipPreprocessConfig().std)
"""One uint8 level after normalisation, in the channel where it is largest."""
SIZES = (224, 56)
NEEDLE_MODEL = Path(__file__).resolve().parents[1] / "assets" / "needle-video-llava"


def natural_frames(height: int, width: int, seed: int, count: int = 3) -> np.ndarray:
    """Moving shapes over smooth colour gradients with sensor-like noise: camera-like content."""
    rng = np.random.default_rng(seed)
    shapes = moving_shapes_video(num_frames=count, height=height, width=width, seed=seed).astype(float)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([128 + 100 * np.sin(x / 37 + seed), 128 + 100 * np.cos(y / 23),
                         128 + 60 * np.sin((x + y) / 50)], -1)
    frames = 0.5 * shapes + 0.5 * gradient[None] + rng.normal(0, 8, shapes.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def noise_frames(height: int, width: int, count: int = 4) -> np.ndarray:
    """Uniform noise: the worst case for a resampler (every pixel an edge)."""
    return np.random.default_rng(height * width).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def on_cpu(config: ClipPreprocessConfig) -> ClipPreprocessConfig:
    return replace(config, device="cpu")


def levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max, mean) absolute difference of two uint8 arrays of one shape, in levels."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    return int(diff.max()), float(diff.mean())


@pytest.fixture
def hf_config():
    """A committed Video-LLaVA checkpoint's config (fresh per test: tests set its `intp`)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(NEEDLE_MODEL)


@pytest.fixture(scope="module")
def h264_videos(tmp_path_factory) -> dict:
    """PyAV-written H.264 files: 640x360, 1280x720 turned 90 and 270 degrees (phone video)."""
    root = tmp_path_factory.mktemp("device_videos")
    return {(h, w, rot): write_video(root / f"{h}p_{rot}.mp4", natural_frames(h, w, seed=h + rot), rotation=rot)
            for h, w, rot in [(360, 640, 0), (720, 1280, 90), (720, 1280, 270)]}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("video", [(360, 640, 0), (720, 1280, 90), (720, 1280, 270)])
def test_decoded_frames_are_within_one_level_of_pillow(h264_videos, video, size):
    config = ClipPreprocessConfig(shortest_edge=size, crop_size=size)
    exact = read_video(h264_videos[video], 3, preprocess=config)
    device = read_video(h264_videos[video], 3, preprocess=on_cpu(config))
    assert device.shape == exact.shape == (3, size, size, 3)
    most, mean = levels(device, exact)
    assert most <= MAX_LEVELS and mean < MEAN_LEVELS, (most, mean)


@pytest.mark.parametrize("height, width", [(360, 640), (361, 643), (480, 360), (37, 500), (100, 150)])
@pytest.mark.parametrize("shortest_edge, crop", [(224, 224), (56, 56), (64, 48)])
def test_frame_arrays_match_at_the_same_crop_offsets(height, width, shortest_edge, crop):
    """Odd sizes, portrait, a wide strip and a crop smaller than the short side: the same output
    shape and offsets (an offset one pixel off breaks the bound, below)."""
    config = ClipPreprocessConfig(shortest_edge=shortest_edge, crop_size=crop)
    for frames, most in ((natural_frames(height, width, seed=height), MAX_LEVELS),
                         (noise_frames(height, width), MAX_LEVELS_NOISE)):
        exact, device = preprocess_frames(frames, config), preprocess_frames(frames, on_cpu(config))
        assert device.shape == exact.shape == (len(frames), 3, crop, crop) and device.dtype == np.float32
        diff = np.abs(device - exact)
        assert diff.max() <= most * NORMALISED_LEVEL * (1 + 1e-5)
        assert (diff > 0).mean() < MEAN_LEVELS


def test_a_natural_image_through_the_image_frame_path():
    """`resize_and_crop` takes a PIL image (image_url frames) on the device path too."""
    image = Image.fromarray(natural_frames(600, 800, seed=7, count=1)[0])
    config = ClipPreprocessConfig()
    most, mean = levels(resize_and_crop(image, on_cpu(config)), resize_and_crop(image, config))
    assert most <= MAX_LEVELS and mean < MEAN_LEVELS


def test_rotation_turns_as_pillow_does():
    frame = natural_frames(90, 160, seed=3, count=1)[0]
    config = ClipPreprocessConfig(shortest_edge=56, crop_size=56)
    for rotation in (0, 90, 180, 270):
        most, _ = levels(resize_and_crop(frame, on_cpu(config), rotation), resize_and_crop(frame, config, rotation))
        assert most <= MAX_LEVELS, rotation
    with pytest.raises(ValueError, match="rotation 45 is not one of 0, 90, 180, 270"):
        resize_and_crop(frame, on_cpu(config), 45)


def test_cropped_frames_are_normalised_exactly():
    """Frames the loader already cropped are only normalised: bit for bit the exact path."""
    frames = noise_frames(224, 224)
    config = ClipPreprocessConfig()
    np.testing.assert_array_equal(preprocess_frames(frames, on_cpu(config)), preprocess_frames(frames, config))


def test_more_frames_than_one_device_batch():
    frames = natural_frames(120, 160, seed=5, count=37)
    config = ClipPreprocessConfig(shortest_edge=56, crop_size=56)
    exact, device = preprocess_frames(frames, config), preprocess_frames(frames, on_cpu(config))
    assert device.shape == (37, 3, 56, 56)
    assert np.abs(device - exact).max() <= NORMALISED_LEVEL * (1 + 1e-5)


def torch_variant(frame: np.ndarray, config: ClipPreprocessConfig, *, mode="bicubic", antialias=True,
                  two_pass=True, shift=0) -> np.ndarray:
    """The device path with one thing changed, for the negative controls."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    height, width = frame.shape[:2]
    out_height, out_width = shortest_edge_size(height, width, config.shortest_edge)
    sizes = [(height, out_width), (out_height, out_width)] if two_pass else [(out_height, out_width)]
    for size in sizes:
        x = F.interpolate(x, size=size, mode=mode, antialias=antialias, align_corners=False).round().clamp(0, 255)
    top, left = (out_height - config.crop_size) // 2, (out_width - config.crop_size) // 2 + shift
    crop = x[0, :, top:top + config.crop_size, left:left + config.crop_size]
    return crop.permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("change, frames", [
    ({}, "natural"),  # the variant itself meets the bound: the controls below differ only by their change
    ({}, "noise"),
    ({"two_pass": False}, "noise"),  # float kept between the passes: bicubic overshoot survives
    ({"antialias": False}, "natural"),
    ({"mode": "bilinear"}, "natural"),
    ({"shift": 1}, "natural"),  # the crop one column off
])
def test_negative_controls_break_the_bound(change, frames):
    config = ClipPreprocessConfig()
    frame = (natural_frames(720, 1280, seed=11, count=1) if frames == "natural" else noise_frames(720, 1280, 1))[0]
    most, mean = levels(torch_variant(frame, config, **change), resize_and_crop(frame, config))
    assert (most <= MAX_LEVELS and mean < MEAN_LEVELS) == (not change), (most, mean)


@pytest.mark.parametrize("value, message", [
    ("gpu", 'intp.preprocess_device must be "pillow" \\(exact, the default\\), "cpu", "cuda" or "cuda:N", got \'gpu\''),
    ("CUDA", "got 'CUDA'"),
    ("cuda:x", "got 'cuda:x'"),
    (0, "got 0"),
    ("cuda:64", "intp.preprocess_device 'cuda:64' names a CUDA device this host does not have"),
])
def test_bad_devices_name_the_key_and_what_is_allowed(value, message):
    with pytest.raises(ValueError, match=message):
        IntpConfig(frames=8, encoder_frames=8, preprocess_device=value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_on_a_host_without_it_is_refused_when_the_config_is_read(hf_config):
    hf_config.intp = {"preprocess_device": "cuda"}
    with pytest.raises(ValueError, match=r"'cuda' names a CUDA device this host does not have \(0 CUDA device"):
        IntpConfig.from_hf_config(hf_config)
    with pytest.raises(ValueError, match="preprocessing device 'cuda:0' names a CUDA device"):
        ClipPreprocessConfig(device="cuda:0")


def test_the_default_is_the_exact_path(hf_config):
    from intp_vllm.vllm_ext.plugin import config_model_class

    adapter = config_model_class(hf_config)
    assert IntpConfig.from_hf_config(hf_config).preprocess_device == "pillow" == ClipPreprocessConfig().device
    assert adapter.preprocess_config(hf_config).device == "pillow"
    hf_config.intp = {"preprocess_device": "cpu"}
    assert adapter.preprocess_config(hf_config) == replace(ClipPreprocessConfig.for_tower(hf_config.vision_config),
                                                           device="cpu")


def test_the_flag_sets_the_key_and_a_bad_device_is_one_line_at_start(capsys):
    from intp_vllm.apps.flags import add_intp_arguments, intp_section

    parser = argparse.ArgumentParser()
    add_intp_arguments(parser)
    assert intp_section(parser.parse_args(["--preprocess-device", "cpu"])) == {"preprocess_device": "cpu"}
    assert "preprocess_device" not in intp_section(parser.parse_args([]))
    assert "CUDA context" in parser.format_help()
    for value, message in (("gpu", "must be \"pillow\" (exact, the default), \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'"),
                           (f"cuda:{torch.cuda.device_count()}", "names a CUDA device this host does not have")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--preprocess-device", value])
        err = capsys.readouterr().err
        assert "error: argument --preprocess-device: --preprocess-device" in err and message in err, err


def test_the_loader_decodes_on_the_device(h264_videos):
    """vLLM's loader with the plugin's `media_io_kwargs.video.preprocess_device`; a bad one
    names the option."""
    from intp_vllm.vllm_ext.media import IntpVideoLoader

    data = h264_videos[(360, 640, 0)].read_bytes()
    exact, _ = IntpVideoLoader.load_bytes(data, num_frames=3, frame_size=224)
    device, metadata = IntpVideoLoader.load_bytes(data, num_frames=3, frame_size=224, preprocess_device="cpu")
    most, mean = levels(device, exact)
    assert most <= MAX_LEVELS and mean < MEAN_LEVELS and metadata["frames_indices"] == [0, 1, 2]
    with pytest.raises(ValueError, match="media_io_kwargs.video preprocess_device must be"):
        IntpVideoLoader.load_bytes(data, num_frames=3, frame_size=224, preprocess_device="tpu")
