"""The `intp` section of a model's HF config: how many frames, how to extend RoPE.

Set it offline with `LLM(model, hf_overrides={"intp": {...}})`, on the server with
`--hf-overrides '{"intp": {...}}'` or `intp-vllm serve --frames ... --rope-type ...`.
Unknown keys or values raise at engine start with the allowed ones listed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from intp_vllm.core.rearrange import GROUPINGS, padded_frame_count
from intp_vllm.core.rope_scaling import ROPE_TYPES
from intp_vllm.core.checks import PILLOW, check_positive_int, check_preprocess_device

DEFAULT_ROPE_TYPE = "yarn"
DEFAULT_ENCODER_FRAMES = 8
TEXT_MARGIN_TOKENS = 512
"""Room for the question and the answer on top of the video tokens when sizing max_model_len."""


@dataclass(frozen=True)
class IntpConfig:
    """Validated INTP settings; `factor` is a number >= 1 or "auto" (per request)."""

    frames: int
    encoder_frames: int
    rope_type: str = DEFAULT_ROPE_TYPE
    factor: float | str = "auto"
    grouping: str = "interleaved"
    max_frames: int | None = None
    fps: float | None = None
    """Sample videos by rate by default: frames a second of video, capped by max_frames
    (core/frame_plan.py); None samples `frames` frames."""
    preprocess_device: str = PILLOW
    """Where frames are resized and cropped: "pillow" (exact, bit for bit HF's) or a torch
    device, "cpu", "cuda" or "cuda:N" (video/preprocess.py: opt-in, within a uint8 level or
    so of the exact path). A CUDA device the host lacks is refused when the config is read."""

    def __post_init__(self) -> None:
        for name in ("frames", "encoder_frames"):
            check_positive_int(f"intp.{name}", getattr(self, name))
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"intp.rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"intp.grouping {self.grouping!r} is not one of {', '.join(GROUPINGS)}")
        if self.factor != "auto":
            if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
                raise ValueError(f'intp.factor must be a number >= 1 or "auto", got {self.factor!r}')
            if not math.isfinite(self.factor) or self.factor < 1:
                raise ValueError(f'intp.factor must be a number >= 1 or "auto", got {self.factor!r}')
        if self.rope_type == "dynamic" and self.factor != "auto":
            raise ValueError(
                f'intp.rope_type "dynamic" takes its scale from each request\'s length; set intp.factor to "auto", '
                f"not {self.factor!r} (or use rope_type \"ntk\" for a fixed scale)"
            )
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not math.isfinite(self.fps) or self.fps <= 0):
            raise ValueError(f"intp.fps must be frames a second of video, a number > 0, got {self.fps!r}")
        check_preprocess_device("intp.preprocess_device", self.preprocess_device)
        if self.max_frames is not None and self.max_frames < self.frames:
            raise ValueError(
                f"intp.max_frames ({self.max_frames}) must be at least intp.frames ({self.frames})"
            )

    @property
    def frame_limit(self) -> int:
        """Most frames one request may carry (the engine's budgets are sized for it)."""
        return self.max_frames or self.frames

    @classmethod
    def from_hf_config(cls, hf_config, *, encoder_frames: int | None = None,
                       frames: int | None = None) -> "IntpConfig":
        """Read `hf_config.intp` (a dict or absent); defaults follow the checkpoint.

        `encoder_frames` and `frames` are the model's defaults for the keys the section leaves
        out (a model adapter's window and trained frame count); None: the window is
        `default_encoder_frames(hf_config)` (Video-LLaVA's rule) and `frames` the window; a
        default `frames` above the section's `max_frames` is lowered to it.
        """
        section = getattr(hf_config, "intp", None) or {}
        if not isinstance(section, dict):
            raise ValueError(f"intp must be a mapping of settings, got {type(section).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise ValueError(f"unknown intp key(s) {unknown}; allowed: {sorted(allowed)}")
        if encoder_frames is None:
            encoder_frames = default_encoder_frames(hf_config)
        encoder_frames = section.get("encoder_frames", encoder_frames)
        frames = encoder_frames if frames is None else frames
        if isinstance(section.get("max_frames"), int):
            frames = min(frames, section["max_frames"])  # a model's default count never exceeds the limit set
        values = {"frames": frames, "encoder_frames": encoder_frames, **section}
        return cls(**values)

    def as_dict(self) -> dict:
        """The settings as a plain dict (for logs and reports)."""
        return asdict(self)


def tokens_per_frame(image_size: int, patch_size: int) -> int:
    """Video tokens one frame becomes: its patches plus CLS, which Video-LLaVA keeps for video
    (257 at 224 px / 14 px patches). The one home of this count."""
    return (image_size // patch_size) ** 2 + 1


def head_size(text_config) -> int:
    """Per-head width of the language model (HF `head_dim`, else hidden size / attention heads)."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def kv_bytes_per_token(text_config, element_size: int) -> int:
    """Bytes of K and V that one token costs in every attention layer, at `element_size` bytes
    an element (4 for float32)."""
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_size(text_config) * element_size


def rope_geometry(text_config) -> tuple[int, int]:
    """(head_size, rotary_dim) of the language model (`partial_rotary_factor` of its heads rotate)."""
    size = head_size(text_config)
    return size, int(size * getattr(text_config, "partial_rotary_factor", 1.0))


def video_tokens(num_frames: int, encoder_frames: int, per_frame: int) -> int:
    """Prompt tokens of a video sampled at `num_frames`: frames padded to whole encoder clips of
    `encoder_frames`, `per_frame` tokens each (`tokens_per_frame`)."""
    return padded_frame_count(num_frames, encoder_frames) * per_frame


def default_encoder_frames(hf_config) -> int:
    """The encoder's trained window: Video-LLaVA records it as video_seq_length / tokens per frame."""
    vision = hf_config.vision_config
    per_frame = tokens_per_frame(vision.image_size, vision.patch_size)
    video_seq_length = getattr(hf_config, "video_seq_length", None)
    if video_seq_length and video_seq_length % per_frame == 0:
        return video_seq_length // per_frame
    return DEFAULT_ENCODER_FRAMES
