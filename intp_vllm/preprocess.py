"""CLIP frame preprocessing in numpy, without torchvision or PIL.

HF's `CLIPImageProcessor` (the numeric reference) resizes with Pillow's antialiased
bicubic filter on uint8 images. A plain cv2 bicubic resize differs from it by one or
more uint8 levels at edges (no antialiasing when shrinking), which is ~0.015 after CLIP
normalisation. So the resize below reproduces Pillow's separable 8-bit resampler:
same filter support, same fixed-point coefficients (22 fractional bits), horizontal
pass then vertical pass, rounding and clipping to uint8 between the passes. The integer
sums are computed in float64, which is exact for them, so the result equals Pillow's;
the only residue against HF is float32 rounding in rescale+normalise (< 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0


@dataclass(frozen=True)
class ClipPreprocessConfig:
    """The parts of a checkpoint's `preprocessor_config.json` that frames go through."""

    shortest_edge: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dict(cls, cfg: dict, default_size: int) -> "ClipPreprocessConfig":
        size = cfg.get("size", {})
        shortest = size.get("shortest_edge", default_size) if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", {})
        crop_size = crop.get("height", shortest) if isinstance(crop, dict) else int(crop)
        return cls(
            shortest_edge=int(shortest),
            crop_size=int(crop_size),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
        )


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _resample_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: (first tap, fixed-point taps)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    valid = offsets[None, :] < (last - first)[:, None]
    weights = _bicubic((first[:, None] + offsets[None, :] - centers[:, None] + 0.5) / filterscale)
    weights = np.where(valid, weights, 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0)
    fixed = np.where(
        weights < 0,
        np.trunc(-0.5 + weights * (1 << _PRECISION_BITS)),
        np.trunc(0.5 + weights * (1 << _PRECISION_BITS)),
    )
    return first, fixed


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of a uint8 (..., H, W, C) array, as Pillow does it."""
    in_size = image.shape[axis]
    first, fixed = _resample_coefficients(in_size, out_size)
    taps = fixed.shape[1]
    index = np.minimum(first[:, None] + np.arange(taps)[None, :], in_size - 1)
    src = np.moveaxis(image, axis, -1).astype(np.float64)  # (..., C, in) after move
    acc = np.full(src.shape[:-1] + (out_size,), float(1 << (_PRECISION_BITS - 1)))
    for tap in range(taps):
        acc += src[..., index[:, tap]] * fixed[:, tap]
    out = np.clip(np.floor(acc / (1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_bicubic(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames (T, H, W, 3) like `PIL.Image.resize(..., BICUBIC)`."""
    out = frames
    if width != frames.shape[2]:
        out = _resample_axis(out, width, axis=2)
    if height != frames.shape[1]:
        out = _resample_axis(out, height, axis=1)
    return out


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output (height, width) with the short side at `shortest_edge`, as HF computes it."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[:, top : top + size, left : left + size]


def preprocess_frames(frames: np.ndarray, config: ClipPreprocessConfig) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) -> float32 pixel values (T, 3, crop, crop)."""
    height, width = shortest_edge_size(frames.shape[1], frames.shape[2], config.shortest_edge)
    resized = resize_bicubic(frames, height, width)
    cropped = center_crop(resized, config.crop_size)
    scaled = cropped.astype(np.float32) * np.float32(1 / 255)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))
