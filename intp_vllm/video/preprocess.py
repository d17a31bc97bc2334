"""CLIP frame preprocessing with Pillow, bit for bit as HF's `CLIPImageProcessor`.

Without torchvision (as here) transformers' `CLIPImageProcessor` is its Pillow backend: resize
the short side to `shortest_edge` with `PIL.Image.resize(..., BICUBIC)`, centre-crop, rescale
by 1/255 in float64 and cast to float32, normalise with the CLIP mean and std in float32. This
module calls the same Pillow resize and repeats the same float operations (as a per-channel
lookup table over the 256 uint8 levels), so its output equals HF's exactly.

Frames are resized and cropped one at a time (`resize_and_crop`), as a decoder yields them:
memory holds the cropped uint8 frames plus one resized frame. A frame whose long side is more
than `MAX_ASPECT_RATIO` times its short side is refused before it is resized: resizing a
3000x4 frame to a short side of 224 makes a 168000x224 image (Qwen2-VL's processor refuses
aspect ratios above 200 for the same reason).

Opt-in, on a torch device (`ClipPreprocessConfig.device`, the INTP key `preprocess_device`):
the same resize and crop as tensors, not bit-exact. The uint8 frame goes to the device, is
turned by `torch.rot90` where Pillow transposes, resized with torch's antialiased bicubic
(`interpolate(mode="bicubic", antialias=True)`, which follows Pillow's filter: a = -0.5,
support scaled by the downscale factor) in Pillow's two passes, rows then columns, each
rounded and clamped to uint8, and centre-cropped at the same offsets (`shortest_edge_size`;
columns outside the crop are dropped before the vertical pass, which never mixes them). Pillow
computes in fixed point, torch in float32, so frames differ from Pillow's by one uint8 level in
at most one value in a few thousand (tests/test_preprocess_device.py bounds both; two levels
where noise is upscaled 6x). A decoded frame comes back as the uint8 crop, one frame a call,
so the decoded-video cache, pruning and the processor get what the exact path gives them, and
normalisation stays the exact 3 x 256 table (it costs a lookup a byte).
Frame arrays given by a user (`preprocess_frames`) go to the device `DEVICE_BATCH` frames at a
time and are normalised there through the same table. On a GPU host the process that
preprocesses (vLLM's API server, or the offline `LLM`'s) opens a CUDA context on that device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from intp_vllm.core.checks import PILLOW, check_positive_int, check_preprocess_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
"""HF's `rescale_factor`; applied in float64, then cast to float32, as `image_transforms.rescale` does."""
MAX_ASPECT_RATIO = 200
"""Largest long side / short side of a frame that is resized (the resized frame has
`shortest_edge` x `shortest_edge * ratio` pixels)."""

DEVICE_BATCH = 16
"""Frames of a frame array moved to a torch device in one call (`preprocess_frames`): at most
16 full-size frames are held there at once (16 x 1080p: 100 MB of uint8, 400 MB as float32)."""

_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class ClipPreprocessConfig:
    """What frames go through before the vision tower (a `preprocessor_config.json`'s CLIP part).

    Raises ValueError when `shortest_edge` or `crop_size` is not a positive integer, or the
    crop is larger than the resized short side (HF would pad; no Video-LLaVA checkpoint does).
    `device` is where frames are resized: "pillow" (the default, bit-exact with HF) or a torch
    device, "cpu", "cuda" or "cuda:N" (module docstring); ValueError for any other name, or a
    CUDA device this host does not have (`core.checks.check_preprocess_device`).
    """

    shortest_edge: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    device: str = PILLOW

    def __post_init__(self) -> None:
        check_preprocess_device("preprocessing device", self.device)
        for name in ("shortest_edge", "crop_size"):
            check_positive_int(f"preprocessing {name}", getattr(self, name))
        if self.crop_size > self.shortest_edge:
            raise ValueError(f"preprocessing crop_size {self.crop_size} is larger than shortest_edge "
                             f"{self.shortest_edge}; it must be at most the resized short side")

    @classmethod
    def for_tower(cls, vision_config, device: str = PILLOW) -> "ClipPreprocessConfig":
        """Video-LLaVA's video processor: short side and crop both the tower's `image_size`."""
        return cls(shortest_edge=vision_config.image_size, crop_size=vision_config.image_size, device=device)


def check_aspect_ratio(width: int, height: int, label: str) -> None:
    """Raise ValueError naming `label` when a `width` x `height` frame exceeds MAX_ASPECT_RATIO."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{label} has {width}x{height} frames (aspect ratio {max(width, height) / min(width, height):.0f}"
                         f":1); at most {MAX_ASPECT_RATIO}:1 is allowed")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output (height, width) with the short side at `shortest_edge`, as HF computes it
    (`get_resize_output_image_size(..., default_to_square=False)`)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def rotate(image: Image.Image, rotation: int) -> Image.Image:
    """`image` turned by a video's display rotation (0, 90, 180 or 270 degrees counter-clockwise),
    losslessly. Raises ValueError for any other angle."""
    if rotation == 0:
        return image
    if rotation not in _ROTATIONS:
        raise ValueError(f"display rotation {rotation!r} is not one of 0, 90, 180, 270 degrees")
    return image.transpose(_ROTATIONS[rotation])


def resize_and_crop(frame: Image.Image | np.ndarray, config: ClipPreprocessConfig, rotation: int = 0) -> np.ndarray:
    """One RGB frame -> uint8 (crop_size, crop_size, 3): HF's resize and centre crop.

    `frame` is a PIL RGB image or a uint8 (H, W, 3) array. `rotation` (0, 90, 180, 270 degrees
    counter-clockwise, a video's display rotation) is applied first, losslessly. A frame already
    at the output size is returned unchanged (Pillow's resize copies it too). Raises ValueError
    for an aspect ratio above MAX_ASPECT_RATIO. With a torch `config.device` the frame is
    resized there (`_resize_and_crop_torch`; a PIL image is read as its array first).
    """
    if isinstance(frame, np.ndarray):
        square = config.shortest_edge == config.crop_size
        if square and frame.shape[:2] == (config.crop_size, config.crop_size) and not rotation:
            return frame
    if config.device != PILLOW:
        return _resize_and_crop_torch([np.asarray(frame)], config, rotation)[0].cpu().numpy()
    if isinstance(frame, np.ndarray):
        frame = Image.fromarray(frame)
    frame = rotate(frame, rotation)
    width, height = frame.size
    check_aspect_ratio(width, height, "a frame")
    out_height, out_width = shortest_edge_size(height, width, config.shortest_edge)
    resized = frame.resize((out_width, out_height), Image.Resampling.BICUBIC)
    top, left = (out_height - config.crop_size) // 2, (out_width - config.crop_size) // 2
    return np.asarray(resized.crop((left, top, left + config.crop_size, top + config.crop_size)))


def _resize_and_crop_torch(frames: list[np.ndarray], config: ClipPreprocessConfig, rotation: int = 0):
    """Same-size uint8 (H, W, 3) frames -> uint8 tensor (T, crop, crop, 3) on `config.device`:
    `resize_and_crop` in torch (module docstring). Raises ValueError as `resize_and_crop` does."""
    import torch

    if rotation not in (0, *_ROTATIONS):
        raise ValueError(f"display rotation {rotation!r} is not one of 0, 90, 180, 270 degrees")
    batch = torch.from_numpy(np.stack(frames)).to(config.device)
    batch = torch.rot90(batch, rotation // 90, (1, 2)).permute(0, 3, 1, 2)
    height, width = batch.shape[2:]
    check_aspect_ratio(width, height, "a frame")
    out_height, out_width = shortest_edge_size(height, width, config.shortest_edge)
    top, left = (out_height - config.crop_size) // 2, (out_width - config.crop_size) // 2
    if out_width != width:  # Pillow's order: rows first, rounded to uint8 between the passes
        batch = _resize_pass(batch, (height, out_width))
    batch = batch[..., left:left + config.crop_size]  # columns never mix in the vertical pass
    if out_height != height:
        batch = _resize_pass(batch, (out_height, config.crop_size))
    return batch[:, :, top:top + config.crop_size].permute(0, 2, 3, 1)


def _resize_pass(batch, size: tuple[int, int]):
    """uint8 (T, 3, H, W) -> uint8 (T, 3, *size), one direction resized: Pillow's antialiased
    bicubic (torch follows its filter), then rounded and clamped to uint8 as Pillow does after
    each pass (without it, bicubic overshoot kept between the passes moves noisy frames by up
    to 6 levels)."""
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(batch.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _normalize_table(config: ClipPreprocessConfig) -> np.ndarray:
    """float32 (3, 256): each channel's normalised value of each uint8 level, computed as HF
    does (float64 rescale, float32 cast, float32 normalisation)."""
    levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def normalize(frames: np.ndarray, config: ClipPreprocessConfig) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W): HF's rescale then normalise, exactly.

    Each output value depends only on its uint8 level and channel, so the float64 rescale,
    float32 cast and float32 normalisation are computed once per level (a 3 x 256 table).
    """
    table = _normalize_table(config)
    out = np.empty((frames.shape[0], 3, *frames.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], frames[..., channel], out=out[:, channel])
    return out


def preprocess_frames(frames: np.ndarray, config: ClipPreprocessConfig) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) -> float32 pixel values (T, 3, crop, crop), equal to HF's.

    With a torch `config.device`, frames not yet at the output size are resized, cropped and
    normalised there, `DEVICE_BATCH` at a time (the normalisation is `normalize`'s table, so
    only the resize differs from HF's); frames already cropped (as the loader hands them on)
    are normalised here, exactly as on the default path.
    """
    square = config.shortest_edge == config.crop_size
    if config.device == PILLOW or (square and frames.shape[1:3] == (config.crop_size, config.crop_size)):
        return normalize(np.stack([resize_and_crop(frame, config) for frame in frames]), config)
    import torch

    table = torch.from_numpy(_normalize_table(config)).to(config.device)
    channels = torch.arange(3, device=table.device)
    out = [table[channels, _resize_and_crop_torch(frames[start:start + DEVICE_BATCH], config).long()]
           for start in range(0, len(frames), DEVICE_BATCH)]
    return torch.cat(out).permute(0, 3, 1, 2).contiguous().cpu().numpy()
