"""vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process.

vLLM starts its engine and workers with `spawn`, so registration has to come from the
installed entry point, not from user code. It must stay cheap (the model module is
imported lazily by vLLM) and idempotent (vLLM may call it more than once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

ARCHITECTURES = ("VideoLlavaForConditionalGeneration", "TemporalVideoLlavaForConditionalGeneration")
"""HF's Video-LLaVA, and ours with a frame-mixing tower (temporal_attention.py); one vLLM class serves both."""
MODEL_CLASS = "intp_vllm.vllm_ext.model:VideoLlavaForConditionalGeneration"
VIDEO_LLAVA_MODEL_TYPE = "video_llava"
"""`config.json` model_type of both; checkpoints without a chat template get ours from vLLM."""

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply


class VideoLlavaConfigHook:
    """Per-architecture config hook (vLLM's MODELS_CONFIG_MAP): validate `intp`, size max_model_len,
    and on CPU size the KV cache from what the configuration needs (`cpu_memory.py`)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """Refuse options that would misread per-request scale codes; size the CPU KV cache."""
        from intp_vllm.core.config import IntpConfig
        from intp_vllm.vllm_ext.cpu_memory import size_cpu_kv_cache

        if IntpConfig.from_hf_config(vllm_config.model_config.hf_config).factor == "auto":
            if vllm_config.speculative_config is not None:
                raise ValueError(
                    "--speculative-config cannot be used with intp factor 'auto': each request's RoPE scale "
                    "rides in its positions (request_scale.py), which vLLM's drafters read as KV-cache slots; "
                    "set a fixed --factor (e.g. --factor 4) or drop --speculative-config")
        size_cpu_kv_cache(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Size max_model_len for intp.max_frames, declare the M-RoPE section that carries
        per-request scales (factor "auto"), and make our loader the video default (frames at
        intp.frames, resized for the tower). Raises for a server frame count outside `intp`."""
        from intp_vllm.core.config import IntpConfig, TEXT_MARGIN_TOKENS, tokens_per_frame, video_tokens

        hf_config = model_config.hf_config
        intp = IntpConfig.from_hf_config(hf_config)
        vision = hf_config.vision_config
        most_video_tokens = video_tokens(intp.frame_limit, intp.encoder_frames,
                                         tokens_per_frame(vision.image_size, vision.patch_size))
        needed = most_video_tokens + TEXT_MARGIN_TOKENS
        if model_config.original_max_model_len is None and model_config.max_model_len < needed:
            model_config.max_model_len = needed
        elif model_config.max_model_len < needed:
            raise ValueError(
                f"max_model_len {model_config.max_model_len} is too short for intp.max_frames {intp.frame_limit} "
                f"({most_video_tokens} video tokens + {TEXT_MARGIN_TOKENS} for text = {needed}): raise "
                f"--max-model-len to {needed}, lower --max-frames, or leave --max-model-len out (it then follows "
                "--max-frames)")
        if intp.factor == "auto":
            # Per-request RoPE scale rides on M-RoPE positions (request_scale.py); declaring
            # an M-RoPE section makes vLLM ask the model for each request's positions.
            from intp_vllm.core.config import rope_geometry

            _, rotary_dim = rope_geometry(hf_config.text_config)
            hf_config.text_config.rope_parameters["mrope_section"] = [rotary_dim // 2]
        if model_config.multimodal_config is not None:
            # Files and URLs are decoded at `frames` frames unless the operator says otherwise,
            # by our loader, which resizes and crops each frame for the tower as it decodes it.
            from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME

            video_io = model_config.multimodal_config.media_io_kwargs.setdefault("video", {})
            if video_io.setdefault("num_frames", intp.frames) != intp.frames:
                raise ValueError(
                    f"--media-io-kwargs video.num_frames={video_io['num_frames']!r}: the frame count is INTP's; "
                    f"set it with --frames (now {intp.frames}) or hf_overrides intp.frames, and per request "
                    "with mm_processor_kwargs.frames"
                )
            if video_io.setdefault("video_backend", MEDIA_HOOK_NAME) == MEDIA_HOOK_NAME:
                video_io.setdefault("frame_size", hf_config.vision_config.image_size)
        logger.info(
            "intp_vllm: %s; up to %d video tokens a request, max_model_len %d",
            intp.as_dict(),
            most_video_tokens,
            model_config.max_model_len,
        )


def prepare_chat_request(render_chat):
    """Wrap vLLM's `BaseRenderer.render_chat` (or `render_chat_async`) so that, for our model,
    a message's image_url frames become one video (`image_frames.frames_as_video`), a video_url's
    `#t=` time range becomes the request's start/end (`video_range.py`), a request's
    `media_io_kwargs.video.num_frames` is its frame count unless it names `frames`
    (`VideoLlavaMultiModalProcessor.request_frames_kwargs`), and the videos of a chat request
    are fetched and decoded at the frame count the model's processor chooses for it
    (`VideoLlavaMultiModalProcessor.request_media_io_kwargs`).

    vLLM hands a video loader only `media_io_kwargs`, never the request's
    `mm_processor_kwargs`; without this a `video_url` is decoded at the server's count and
    a request's `frames` would sample from those. Other models' renderers are unchanged.
    """

    @functools.wraps(render_chat)
    def wrapper(self, conversations, chat_params, *args, prompt_extras=None, **kwargs):
        choose = getattr(self.mm_processor, "request_media_io_kwargs", None)
        if choose is not None:
            from vllm.multimodal.media.connector import merge_media_io_kwargs

            conversations, chat_params, prompt_extras = _frames_as_video(self, conversations, chat_params,
                                                                         prompt_extras)
            from intp_vllm.vllm_ext.video_range import fragment_time_range

            conversations, mm_kwargs = fragment_time_range(conversations, chat_params.mm_processor_kwargs)
            if mm_kwargs is not chat_params.mm_processor_kwargs:
                chat_params, prompt_extras = _with_mm_processor_kwargs(chat_params, prompt_extras, mm_kwargs)
            defaults = self.model_config.multimodal_config.media_io_kwargs
            media_io_kwargs = merge_media_io_kwargs(defaults, chat_params.media_io_kwargs)
            mm_kwargs = self.mm_processor.request_frames_kwargs(media_io_kwargs or {}, chat_params.mm_processor_kwargs)
            if mm_kwargs is not chat_params.mm_processor_kwargs:
                chat_params, prompt_extras = _with_mm_processor_kwargs(chat_params, prompt_extras, mm_kwargs)
            chat_params = dataclasses.replace(
                chat_params, media_io_kwargs=choose(media_io_kwargs or {}, chat_params.mm_processor_kwargs)
            )
        return render_chat(self, conversations, chat_params, *args, prompt_extras=prompt_extras, **kwargs)

    wrapper.intp_vllm_wrapped = True
    return wrapper


def _frames_as_video(renderer, conversations, chat_params, prompt_extras):
    """Conversations with image_url frames as one video each; chat params and prompt extras
    (which carry the request's `mm_processor_kwargs` to the processor) asking for all of their
    frames unless the request asked for a count (`image_frames.py`)."""
    from vllm import envs

    from intp_vllm.vllm_ext.image_frames import frames_as_video
    from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME, ServeLimits
    from intp_vllm.vllm_ext.model import REQUEST_FRAMES_KWARG

    conversations, counts = frames_as_video(
        conversations, enabled=ServeLimits.from_env().image_frames,
        frame_limit=renderer.mm_processor.info.get_intp_config().frame_limit,
        connector_serves_frames=envs.VLLM_MEDIA_CONNECTOR == MEDIA_HOOK_NAME)
    if len(counts) > 1:
        raise ValueError(f"conversations of {sorted(counts)} image_url frames in one call: their frame counts "
                         "differ; send each in its own call")
    if counts:
        mm_kwargs = {REQUEST_FRAMES_KWARG: counts.pop(), **(chat_params.mm_processor_kwargs or {})}
        chat_params, prompt_extras = _with_mm_processor_kwargs(chat_params, prompt_extras, mm_kwargs)
    return conversations, chat_params, prompt_extras


def _with_mm_processor_kwargs(chat_params, prompt_extras, mm_kwargs):
    """Chat params and prompt extras (which carry a request's `mm_processor_kwargs` to the
    processor) with `mm_kwargs` as the request's."""
    return (dataclasses.replace(chat_params, mm_processor_kwargs=mm_kwargs),
            {**(prompt_extras or {}), "mm_processor_kwargs": mm_kwargs})


def salt_with_request_scale(process_tokens):
    """Wrap vLLM's `BaseRenderer._process_tokens` so that a client's `cache_salt` is joined to
    the request's RoPE-scale salt (`request_scale.join_cache_salts`) instead of replacing it.

    vLLM sets the client's salt on the processor's result after the processor returns,
    overwriting the scale salt the processor set. Every request of a model with per-request
    scales is salted this way, text-only ones too (at scale 1).
    """

    @functools.wraps(process_tokens)
    def wrapper(self, prompt, *args, **kwargs):
        prompt, client_salt = _take_client_salt(self, prompt)
        return _join_salts(process_tokens(self, prompt, *args, **kwargs), client_salt)

    wrapper.intp_vllm_wrapped = True
    return wrapper


def salt_with_request_scale_async(process_tokens_async):
    """`salt_with_request_scale` for `BaseRenderer._process_tokens_async`."""

    @functools.wraps(process_tokens_async)
    async def wrapper(self, prompt, *args, **kwargs):
        prompt, client_salt = _take_client_salt(self, prompt)
        return _join_salts(await process_tokens_async(self, prompt, *args, **kwargs), client_salt)

    wrapper.intp_vllm_wrapped = True
    return wrapper


def _take_client_salt(renderer, prompt) -> tuple[dict, str | None]:
    """The prompt without its client salt, and that salt (None for models without per-request scales)."""
    if not getattr(renderer.mm_processor, "per_request_scale", False) or "cache_salt" not in prompt:
        return prompt, None
    return {key: value for key, value in prompt.items() if key != "cache_salt"}, prompt["cache_salt"]


def _join_salts(engine_input: dict, client_salt: str | None) -> dict:
    from intp_vllm.core.request_scale import join_cache_salts

    if client_salt is not None:
        engine_input["cache_salt"] = join_cache_salts(client_salt, engine_input.get("cache_salt"))
    return engine_input


RENDERER_WRAPPERS = {
    "render_chat": prepare_chat_request,
    "render_chat_async": prepare_chat_request,
    "_process_tokens": salt_with_request_scale,
    "_process_tokens_async": salt_with_request_scale_async,
}
"""vLLM `BaseRenderer` methods the plugin wraps, and how; each wrapper is a no-op for other models."""


def register() -> None:
    """The plugin's entry point: registers the model for both architectures, its config hook,
    our video loader and media connector, the chat-template fallback and the renderer wrappers.
    Idempotent."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.chat_templates.registry import (
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
    )

    from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME, BoundedMediaConnector, IntpVideoLoader
    from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE_PATH

    from vllm.renderers.base import BaseRenderer

    for name, wrap in RENDERER_WRAPPERS.items():
        if not getattr(getattr(BaseRenderer, name), "intp_vllm_wrapped", False):
            setattr(BaseRenderer, name, wrap(getattr(BaseRenderer, name)))
    VIDEO_LOADER_REGISTRY.register(MEDIA_HOOK_NAME)(IntpVideoLoader)
    MEDIA_CONNECTOR_REGISTRY.register(MEDIA_HOOK_NAME)(BoundedMediaConnector)  # used where VLLM_MEDIA_CONNECTOR says
    if get_chat_template_fallback_path(VIDEO_LLAVA_MODEL_TYPE, "") is None:
        register_chat_template_fallback_path(VIDEO_LLAVA_MODEL_TYPE, VIDEO_LLAVA_CHAT_TEMPLATE_PATH)
    for architecture in ARCHITECTURES:
        MODELS_CONFIG_MAP[architecture] = VideoLlavaConfigHook
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL_CLASS)
