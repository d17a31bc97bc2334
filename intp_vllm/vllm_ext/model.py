"""The INTP model layer for vLLM, shared by every video model: processing info, dummy inputs,
multimodal processor and the model's INTP half; a model adapter (`models/`) gives the rest.

What does not depend on the model lives here once: the `intp` section and the per-request
frame decision (`IntpMultiModalProcessor.requested_frames` ...), pruning (pruning.py), the
per-request RoPE scale code and its cache salt (request_scale.py), the M-RoPE positions that
carry it, `embed_multimodal` (INTP's interleaved groups through the adapter's encoder, tokens
back in frame-time order, then pruned) and the rotary swap (llm_rope.py).

An adapter subclasses `IntpVideoModel`, decorates itself with `intp_video_model` (which
registers this processor for it) and gives only what is its own (docs/adapters.md): the
tower, pooling and projector (`build_video_encoder`, `encode_clips`), tokens per frame,
whether a frame starts with a CLS token, its encoder window and trained frame count, its
weight names (`hf_to_vllm_mapper`) and its prompt placeholder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import BatchFeature

from intp_vllm.vllm_ext.internals import (
    MULTIMODAL_REGISTRY,
    AutoWeightsLoader,
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    IntermediateTensors,
    MultiModalDataItems,
    MultiModalDummyOptions,
    MultiModalEmbeddings,
    MultiModalFieldConfig,
    MultiModalKwargsItems,
    PromptReplacement,
    PromptUpdate,
    SupportsMRoPE,
    SupportsMultiModal,
    SupportsMultiModalPruning,
    SupportsPP,
    VllmConfig,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)

from intp_vllm.core.checks import PILLOW
from intp_vllm.core.config import IntpConfig
from intp_vllm.core.frame_plan import FRAME_KEYS, FrameRequest
from intp_vllm.core.prompt import VIDEO_PLACEHOLDER
from intp_vllm.core.rope_scaling import CheckpointRope
from intp_vllm.vllm_ext.llm_rope import install_scaled_rope
from intp_vllm.vllm_ext.pruning import PRUNING_METHODS, VideoPruning
from intp_vllm.video.preprocess import ClipPreprocessConfig, preprocess_frames
from intp_vllm.core.grouped_encoding import encode_in_groups, encoded_chunks
from intp_vllm.core.rearrange import pad_frame_indices, padded_frame_count, uniform_frame_indices
from intp_vllm.core.request_scale import encode_positions, position_offset, request_scale_code, scale_cache_salt
from intp_vllm.video.io import as_frames

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply

REQUEST_FRAMES_KWARG = "frames"
"""`mm_processor_kwargs={"frames": n}` asks for n frames (up to intp.max_frames)."""
PRUNING_RATE_KWARG = "pruning_rate"
PRUNING_METHOD_KWARG = "pruning_method"
"""`mm_processor_kwargs={"pruning_rate": q, "pruning_method": "evs"}` prunes a request's video
tokens (pruning.py); the defaults are the server's --video-pruning-rate / --video-pruning-method."""
REQUEST_KWARGS = (*FRAME_KEYS, PRUNING_RATE_KWARG, PRUNING_METHOD_KWARG)
"""`fps`, `start`, `end` beside `frames`: sampling by rate and within a time range (core/frame_plan.py)."""
PRUNING_RATE_KEY, PRUNING_METHOD_KEY = "video_pruning_rate", "video_pruning_method"
"""Each video's pruning, as the processor decided it, in its data for `embed_multimodal`
(the method as its index in PRUNING_METHODS)."""
SCALE_CODE_KEY = "rope_scale_code"
"""The request's RoPE scale code (request_scale.py): set by the processor, never by a request;
it rides in the processor kwargs (so in the multimodal cache key) and in each video's data."""


class IntpProcessingInfo(BaseProcessingInfo):
    """What vLLM's processor and profiler need to know of a checkpoint: limits, INTP settings,
    preprocessing and token counts (vLLM's `BaseProcessingInfo`), from the model's adapter
    (`model_cls`, set per model by `intp_video_model`)."""

    model_cls: type["IntpVideoModel"]

    def get_hf_processor(self, **kwargs: object):
        """Never: frames are preprocessed by `video.preprocess` (bit-exact with HF's). Raises."""
        raise RuntimeError("intp_vllm preprocesses video itself (preprocess.py); the HF processor is never used")

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        """One video a prompt; images are not served."""
        return {"video": 1}

    def get_intp_config(self) -> IntpConfig:
        """The checkpoint's `intp` section with the engine's overrides, the adapter's defaults
        for what it leaves out (`IntpVideoModel.intp_config`)."""
        return self.model_cls.intp_config(self.get_hf_config())

    def get_preprocess_config(self) -> ClipPreprocessConfig:
        """Resize/crop/normalise as the tower was trained (the adapter's `preprocess_config`)."""
        return self.model_cls.preprocess_config(self.get_hf_config())

    def get_tokens_per_frame(self) -> int:
        """Video tokens per frame (the adapter's `tokens_per_frame`)."""
        return self.model_cls.tokens_per_frame(self.get_hf_config())

    def get_trained_context(self) -> int:
        """Tokens the language model was trained to, its own RoPE scaling included
        (`CheckpointRope.trained_context`): a request's RoPE scale is measured against it."""
        return CheckpointRope.from_text_config(self.get_hf_config().text_config).trained_context

    def get_num_video_tokens(self, num_frames: int, pruning: VideoPruning | None = None) -> int:
        """Prompt tokens of a video sampled at `num_frames`, padded to whole encoder clips, and
        left by `pruning` (pruning.py; None prunes nothing)."""
        return self.model_cls.video_tokens(self.get_hf_config(), num_frames, pruning)

    def get_default_pruning(self) -> VideoPruning:
        """The server's pruning: vLLM's --video-pruning-rate / --video-pruning-method."""
        return VideoPruning.of_server(self.ctx.model_config.multimodal_config)

    def get_video_token_budget(self) -> int:
        """The most tokens one video may take (`IntpVideoModel.max_video_tokens` at the server's pruning)."""
        return self.model_cls.max_video_tokens(self.get_hf_config(), self.get_default_pruning())

    def check_video_tokens(self, num_frames: int, pruning: VideoPruning) -> None:
        """Raises ValueError, naming the request's fields, when a video of `num_frames` frames
        pruned by `pruning` takes more tokens than `get_video_token_budget`."""
        tokens, budget = self.get_num_video_tokens(num_frames, pruning), self.get_video_token_budget()
        if tokens > budget:
            server = self.get_default_pruning()
            raise ValueError(
                f"{num_frames} frames at mm_processor_kwargs.{PRUNING_RATE_KWARG}={pruning.rate:g} "
                f"({pruning.method}) take {tokens} video tokens; this server holds at most {budget} a video "
                f"(--max-frames {self.get_intp_config().frame_limit} at --video-pruning-rate {server.rate:g}): ask "
                f"for fewer frames (mm_processor_kwargs.max_frames) or a {PRUNING_RATE_KWARG} of at least "
                f"{server.rate:g}")

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The most tokens one video can take (`get_video_token_budget`): what vLLM sizes its
        encoder cache and encoder compute budget by (each the larger of this and max_num_batched_tokens)."""
        return {"video": self.get_video_token_budget()}


class IntpDummyInputsBuilder(BaseDummyInputsBuilder[IntpProcessingInfo]):
    """Profiling inputs for vLLM's memory check: the largest video a request may send."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        """One placeholder per video."""
        return self.info.model_cls.video_placeholder * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        """Videos of intp.max_frames frames at the tower's input size."""
        size = self.info.get_preprocess_config().crop_size
        return {
            "video": self._get_dummy_videos(
                width=size,
                height=size,
                num_frames=self.info.get_intp_config().frame_limit,
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video") if mm_options else None,
            )
        }


def select_frames(num_frames: int, requested: int, encoder_frames: int) -> np.ndarray:
    """Indices into a video of `num_frames` frames: sample down to `requested`, pad to a multiple of N."""
    sampled = uniform_frame_indices(num_frames, requested)
    return sampled[pad_frame_indices(len(sampled), encoder_frames)]


class IntpMultiModalProcessor(BaseMultiModalProcessor[IntpProcessingInfo]):
    """A request's video -> pixel values and placeholders; decides its frame count and, with
    factor "auto", its RoPE scale, each once (vLLM's `BaseMultiModalProcessor`)."""

    def requested_frames(self, mm_processor_kwargs: Mapping[str, object] | None) -> int:
        """The most frames a request gets: `mm_processor_kwargs.frames` (else intp.frames), or
        intp.max_frames when it samples by rate (`frame_request`). Raises ValueError naming the kwarg."""
        return self.frame_request(mm_processor_kwargs).cap

    def frame_request(self, mm_processor_kwargs: Mapping[str, object] | None) -> FrameRequest:
        """A request's frames, rate and time range, checked (core/frame_plan.py: `frames` or `fps`,
        `start`/`end`; intp.frames / intp.fps by default, at most intp.max_frames). Raises ValueError
        naming the kwarg and what is allowed."""
        intp = self.info.get_intp_config()
        return FrameRequest.from_kwargs(mm_processor_kwargs, default_frames=intp.frames, limit=intp.frame_limit,
                                        default_fps=intp.fps)

    def requested_pruning(self, mm_processor_kwargs: Mapping[str, object] | None) -> VideoPruning:
        """A request's pruning: `mm_processor_kwargs` pruning_rate / pruning_method over the
        server's. Raises ValueError naming the kwarg."""
        default = self.info.get_default_pruning()
        kwargs = mm_processor_kwargs or {}
        try:
            return VideoPruning(kwargs.get(PRUNING_METHOD_KWARG, default.method),
                                kwargs.get(PRUNING_RATE_KWARG, default.rate))
        except ValueError as exc:
            raise ValueError(f"mm_processor_kwargs.{exc}") from None

    def request_frames_kwargs(
        self, media_io_kwargs: Mapping[str, Mapping[str, object]], mm_processor_kwargs: Mapping[str, object] | None
    ) -> Mapping[str, object] | None:
        """`mm_processor_kwargs` asking for `media_io_kwargs.video.num_frames` frames when a
        request sets that count (to other than intp.frames) and no `frames` of its own, else
        `mm_processor_kwargs` as they are: a client that can only send vLLM's `num_frames`
        (lmms-eval with `pass_video_url`) gets that many frames, up to intp.max_frames.

        Called by the renderer before `request_media_io_kwargs` (plugin.py). Raises ValueError
        for a `num_frames` outside 1..intp.max_frames.
        """
        intp = self.info.get_intp_config()
        asked = (media_io_kwargs.get("video") or {}).get("num_frames", intp.frames)
        if asked == intp.frames or REQUEST_FRAMES_KWARG in (mm_processor_kwargs or {}):
            return mm_processor_kwargs
        if isinstance(asked, bool) or not isinstance(asked, int) or not 1 <= asked <= intp.frame_limit:
            raise ValueError(f"media_io_kwargs.video.num_frames={asked!r}: expected an integer from 1 to "
                             f"{intp.frame_limit} (intp.max_frames), the frames this request's video is read at")
        return {**(mm_processor_kwargs or {}), REQUEST_FRAMES_KWARG: asked}

    def request_media_io_kwargs(
        self, media_io_kwargs: Mapping[str, Mapping[str, object]], mm_processor_kwargs: Mapping[str, object] | None
    ) -> dict[str, dict[str, object]]:
        """`media_io_kwargs` with `video.num_frames` set to the request's frames (and `fps`,
        `start`, `end` where the request samples by rate or range: `FrameRequest.loader_kwargs`),
        so that a video from a URL, file or data URL is decoded at the count this processor then uses.

        Called by the renderer before any video is fetched (plugin.py). Raises ValueError for a
        frame count outside 1..intp.max_frames, a `num_frames` that names another count, or a
        `preprocess_device` other than the server's (a request may not open a GPU context in the
        API server, nor move the server's work to its CPU).
        """
        request = self.frame_request(mm_processor_kwargs)
        requested = request.cap
        video = dict(media_io_kwargs.get("video") or {})
        server_device = self.info.get_intp_config().preprocess_device
        if video.get("preprocess_device", PILLOW) != server_device:
            raise ValueError(f"media_io_kwargs.video.preprocess_device={video['preprocess_device']!r}: where frames "
                             f"are resized is the server's setting (--preprocess-device, here {server_device!r}); "
                             "drop it from the request")
        asked = video.get("num_frames", requested)
        if asked not in (requested, self.info.get_intp_config().frames):
            raise ValueError(
                f"media_io_kwargs.video.num_frames={asked!r} conflicts with {requested} frames: a request's "
                f"frame count is mm_processor_kwargs.{REQUEST_FRAMES_KWARG} (up to intp.max_frames); "
                "drop num_frames"
            )
        sampling = sorted(set(video) & set(FRAME_KEYS[1:]))
        if sampling:
            raise ValueError(f"media_io_kwargs.video {sampling}: a request's rate and time range are "
                             f"mm_processor_kwargs {list(FRAME_KEYS[1:])} (or a video_url #t= fragment)")
        video.update(request.loader_kwargs())
        return {**media_io_kwargs, "video": video}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        unknown = sorted(set(hf_kwargs) - {*REQUEST_KWARGS, SCALE_CODE_KEY})
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown}; allowed: {list(REQUEST_KWARGS)}")
        requested = self.requested_frames(hf_kwargs)
        pruning = self.requested_pruning(hf_kwargs)
        encoder_frames = self.info.get_intp_config().encoder_frames
        preprocess = self.info.get_preprocess_config()
        pixel_values = []
        for i, video in enumerate(hf_data.get("videos", [])):
            frames = as_frames(video, name=f"video {i}")
            chosen = frames[select_frames(len(frames), requested, encoder_frames)]
            self.info.check_video_tokens(len(chosen), pruning)
            pixel_values.append(torch.from_numpy(preprocess_frames(chosen, preprocess)))
        outputs = {"pixel_values_videos": pixel_values,
                   PRUNING_RATE_KEY: torch.full((len(pixel_values),), pruning.rate, dtype=torch.float64),
                   PRUNING_METHOD_KEY: torch.full((len(pixel_values),), pruning.code, dtype=torch.int64)}
        if SCALE_CODE_KEY in hf_kwargs:
            outputs[SCALE_CODE_KEY] = torch.full((len(pixel_values),), hf_kwargs[SCALE_CODE_KEY], dtype=torch.int64)
        return BatchFeature(outputs)

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _expanded_prompt_length(self, inputs) -> int:
        """Prompt tokens once each video placeholder has become its video tokens."""
        requested = self.requested_frames(inputs.hf_processor_mm_kwargs)
        pruning = self.requested_pruning(inputs.hf_processor_mm_kwargs)
        length = len(inputs.prompt)
        videos = inputs.mm_data_items.get("video")
        for i in range(videos.get_count() if videos is not None else 0):
            video = videos.get(i)
            if video is None:
                raise ValueError(f"video {i} came as a multi_modal_uuid alone: with intp factor 'auto' its frames "
                                 "decide the request's RoPE scale, so send the video itself")
            frames = len(as_frames(video, name=f"video {i}"))
            length += self.info.get_num_video_tokens(min(frames, requested), pruning) - 1
        return length

    def apply(self, inputs, timing_ctx):
        """With intp factor "auto", decide the request's RoPE scale once, here (request_scale.py).

        The code comes from the expanded prompt length and is added to the processor kwargs, so
        it is part of each video's cache key and data (`SCALE_CODE_KEY`, read by
        `get_mrope_input_positions`). Keys are cached after RoPE, so the prefix cache is salted
        with it too (`request_scale.scale_cache_salt`; a client's own salt is joined to it by
        `plugin.salt_with_request_scale`): blocks computed at one scale never serve another.
        """
        if SCALE_CODE_KEY in inputs.hf_processor_mm_kwargs:
            raise ValueError(f"mm_processor_kwargs.{SCALE_CODE_KEY} is set by the server; allowed: "
                             f"{list(REQUEST_KWARGS)}")
        if not self.per_request_scale:
            return super().apply(inputs, timing_ctx)
        trained_context = self.info.get_trained_context()
        code = request_scale_code(self._expanded_prompt_length(inputs), trained_context)
        kwargs = {**inputs.hf_processor_mm_kwargs, SCALE_CODE_KEY: code}
        result = super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)
        if code:
            result["cache_salt"] = scale_cache_salt(code)
        return result

    @property
    def per_request_scale(self) -> bool:
        """Whether each request gets its own RoPE scale (intp factor "auto"), and so its own salt."""
        return self.info.get_intp_config().factor == "auto"

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = {"pixel_values_videos": MultiModalFieldConfig.batched("video"),
                  PRUNING_RATE_KEY: MultiModalFieldConfig.batched("video"),
                  PRUNING_METHOD_KEY: MultiModalFieldConfig.batched("video")}
        if SCALE_CODE_KEY in hf_inputs:
            # keep_on_cpu: vLLM keeps only such fields for M-RoPE when the prefix cache covers a video
            fields[SCALE_CODE_KEY] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        video_token_id = self.info.get_hf_config().video_token_index
        per_frame = self.info.get_tokens_per_frame()
        cls_token = self.info.model_cls.cls_token

        def replacement(item_idx: int) -> list[int]:
            """The video's placeholder becomes one token per kept frame token (frames padded to clips)."""
            item = out_mm_kwargs["video"][item_idx]
            pruning = VideoPruning.from_code(item[PRUNING_METHOD_KEY].data, item[PRUNING_RATE_KEY].data)
            frames = item["pixel_values_videos"].data.shape[0]
            return [video_token_id] * pruning.kept_tokens(frames, per_frame, cls_token)

        return [PromptReplacement(modality="video", target=[video_token_id], replacement=replacement)]


class IntpVideoModel(nn.Module, SupportsMultiModal, SupportsPP, SupportsMRoPE, SupportsMultiModalPruning):
    """A video LLM with INTP: the adapter's encoder on interleaved groups, vLLM's language model
    with the swapped rotary, per-request scales in the positions, pruning after rearrangement.

    An adapter (docs/adapters.md) sets `hf_to_vllm_mapper`, `model_name` and, where they differ
    from the defaults, `cls_token` and `video_placeholder`; it implements
    `tokens_per_frame`, `build_video_encoder` and `encode_clips`, and where needed
    `default_encoder_frames`, `default_frames` and `preprocess_config`. The language model is
    `hf_config.text_config` built by vLLM (`language_model`).
    """

    model_name: str = "this model"
    """For messages: what the adapter serves."""
    cls_token: bool = False
    """Whether each frame's tokens start with a CLS token (pruning always keeps it, pruning.py)."""
    video_placeholder: str = VIDEO_PLACEHOLDER
    """What the prompt holds where a video goes (its token is `hf_config.video_token_index`)."""
    hf_to_vllm_mapper: WeightsMapper
    supported_video_pruning_methods = PRUNING_METHODS
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    # ---- what an adapter gives (config side: also used before the model is built) ----

    @classmethod
    def tokens_per_frame(cls, hf_config) -> int:
        """Video tokens one frame becomes in the language model's prompt."""
        raise NotImplementedError

    @classmethod
    def pool_stride(cls, hf_config) -> int:
        """Side of the square of the tower's patch features that one video token pools (1: no
        pooling); what `intp-vllm bench` counts the pooling's FLOPs by."""
        return 1

    @classmethod
    def default_encoder_frames(cls, hf_config) -> int | None:
        """The encoder's window N when `intp.encoder_frames` is not set (None: IntpConfig's rule).
        An encoder that sees each frame on its own has N = 1: INTP's grouping is then the identity."""
        return None

    @classmethod
    def default_frames(cls, hf_config) -> int | None:
        """Frames a request gets when `intp.frames` is not set (None: the window N)."""
        return None

    @classmethod
    def preprocess_config(cls, hf_config) -> ClipPreprocessConfig:
        """Frame preprocessing: CLIP's at the tower's size (short side and crop `image_size`), on
        `intp.preprocess_device`."""
        return ClipPreprocessConfig.for_tower(hf_config.vision_config, cls.intp_config(hf_config).preprocess_device)

    @classmethod
    def intp_config(cls, hf_config) -> IntpConfig:
        """The `intp` section of `hf_config` with this model's defaults for what it leaves out."""
        return IntpConfig.from_hf_config(hf_config, encoder_frames=cls.default_encoder_frames(hf_config),
                                         frames=cls.default_frames(hf_config))

    @classmethod
    def video_tokens(cls, hf_config, num_frames: int, pruning: VideoPruning | None = None) -> int:
        """Prompt tokens of a video of `num_frames` frames, padded to whole encoder clips, and left
        by `pruning` (pruning.py; None prunes nothing)."""
        frames = padded_frame_count(num_frames, cls.intp_config(hf_config).encoder_frames)
        return (pruning or VideoPruning()).kept_tokens(frames, cls.tokens_per_frame(hf_config), cls.cls_token)

    @classmethod
    def max_video_tokens(cls, hf_config, pruning: VideoPruning | None = None) -> int:
        """Prompt tokens one video may take, where `pruning` is the server's (None: none): the
        larger of intp.max_frames frames so pruned and intp.frames frames unpruned (so a
        request at the default count may turn pruning off). `max_model_len` (plugin.py) and
        vLLM's encoder cache follow it: at --max-frames 1024 and --video-pruning-rate 0.75 a
        video holds a quarter of the tokens, and so does the KV a full-length request reserves."""
        intp = cls.intp_config(hf_config)
        return max(cls.video_tokens(hf_config, intp.frame_limit, pruning), cls.video_tokens(hf_config, intp.frames))

    def build_video_encoder(self, vllm_config: VllmConfig, prefix: str) -> None:
        """Create the tower, pooling and projector modules (named as the mapped weights)."""
        raise NotImplementedError

    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """Frozen encoder on clips (K, N, 3, H, W) -> (K, N, tokens_per_frame, text hidden)."""
        raise NotImplementedError

    # ---- the INTP layer ----

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        """What vLLM's chat parser puts in the prompt for a video part. Raises for other modalities."""
        if modality.startswith("video"):
            return cls.video_placeholder
        raise ValueError(f"modality {modality!r} is not served; {cls.model_name} here takes 'video' only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.intp = self.intp_config(config)
        with self._mark_tower_model(vllm_config, "video"):
            self.build_video_encoder(vllm_config, prefix)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.model.make_empty_intermediate_tensors
        self.rope = install_scaled_rope(
            self.language_model,
            config.text_config,
            self.intp,
            vllm_config.model_config.max_model_len,
            vllm_config.model_config.dtype,
        )
        logger.info("intp_vllm: language model RoPE %s", self.rope.extra_repr())

    def embed_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) with F a multiple of N -> (F * tokens_per_frame, hidden) in frame-time order."""
        return encode_in_groups(pixels, self.encode_clips, self.intp.encoder_frames, self.intp.grouping)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """A request's positions with its RoPE scale encoded in them (see request_scale.py).

        vLLM asks this once per request at prefill; only used with intp.factor "auto". The
        scale code is the one the processor decided (each video's `SCALE_CODE_KEY`); requests
        without video keep scale 1. Returns ((3, prompt tokens) int64, M-RoPE delta).
        """
        codes = {int(feature.data[SCALE_CODE_KEY].data) for feature in mm_features}
        if len(codes) > 1:
            raise ValueError(f"a request's videos carry different RoPE scale codes {sorted(codes)}")
        code = codes.pop() if codes else 0
        positions = encode_positions(len(input_tokens), code)
        return positions.expand(3, -1).clone(), position_offset(code)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """vLLM's pruning hook (`SupportsMultiModalPruning`): positions stay as they are. The
        processor already gave a pruned video as many placeholders as it keeps tokens, so
        `get_mrope_input_positions` numbered the kept tokens in order; the delta is the scale
        code's offset, read back from the first position."""
        return multimodal_embeddings, mrope_positions, int(mrope_positions[0, 0])

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One (kept tokens, text_hidden) tensor per video of the batch, in the order of
        `pixel_values_videos`, tokens in frame-time order (INTP's groups put back), pruned by the
        video's pruning as each encoder chunk is ready (pruning.py `prune_chunks`; all
        F * tokens_per_frame kept at rate 0); [] when the batch holds no video. F is each video's
        padded frame count."""
        videos = kwargs.get("pixel_values_videos")
        if videos is None:
            return []
        rates, methods = kwargs[PRUNING_RATE_KEY], kwargs[PRUNING_METHOD_KEY]
        embeddings = []
        for video, rate, method in zip(videos, rates, methods):
            chunks = encoded_chunks(video, self.encode_clips, self.intp.encoder_frames, self.intp.grouping)
            embeddings.append(VideoPruning.from_code(method, rate).prune_chunks(chunks, video.shape[0],
                                                                                self.cls_token))
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        """The language model over (tokens,) ids or (tokens, hidden) embeddings at `positions`,
        (tokens,) or M-RoPE (3, tokens) with the scale code in them; -> (tokens, hidden)."""
        if intermediate_tensors is not None:
            inputs_embeds = None
        if positions.ndim == 2:
            # M-RoPE layout [3, tokens] (per-request scale): the channels are equal, and vLLM's
            # Llama marks positions' dim 0 as the dynamic token dim for torch.compile.
            positions = positions[0]
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """(tokens, text_hidden) -> (tokens, vocab) logits (None on pipeline stages without the head)."""
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF checkpoint tensors by name (`hf_to_vllm_mapper`); returns the names loaded."""
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)


def intp_video_model(model_cls: type[IntpVideoModel]) -> type[IntpVideoModel]:
    """Class decorator for an adapter: registers the INTP processor, processing info (bound to
    `model_cls`) and dummy inputs for it with vLLM's multimodal registry."""
    info = type(f"{model_cls.__name__}ProcessingInfo", (IntpProcessingInfo,), {"model_cls": model_cls})
    return MULTIMODAL_REGISTRY.register_processor(IntpMultiModalProcessor, info=info,
                                                  dummy_inputs=IntpDummyInputsBuilder)(model_cls)
