"""vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process.

vLLM starts its engine and workers with `spawn`, so registration has to come from the
installed entry point, not from user code. It must stay cheap (the model module is
imported lazily by vLLM) and idempotent (vLLM may call it more than once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

VIDEO_LLAVA_CLASS = "intp_vllm.vllm_ext.models.video_llava:VideoLlavaForConditionalGeneration"
MODEL_CLASSES = {
    "VideoLlavaForConditionalGeneration": VIDEO_LLAVA_CLASS,
    "TemporalVideoLlavaForConditionalGeneration": VIDEO_LLAVA_CLASS,  # ours, a frame-mixing tower
    "LlavaNextVideoForConditionalGeneration": "intp_vllm.vllm_ext.models.llava_next_video:"
                                              "LlavaNextVideoForConditionalGeneration",  # takes over vLLM's
}
"""The architectures the plugin serves, each with its INTP model adapter (`vllm_ext/models/`)."""
VIDEO_LLAVA_MODEL_TYPE = "video_llava"
"""`config.json` model_type of both; checkpoints without a chat template get ours from vLLM."""
LLAVA_NEXT_VIDEO_MODEL_TYPE = "llava_next_video"
"""Its checkpoints may keep their chat template in the processor's `chat_template.json` only,
which vLLM reads through HF's processor (torchvision): `processor_chat_template` reads it."""

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply


def model_class(architecture: str):
    """The adapter class (`model.IntpVideoModel`) serving `architecture`, imported."""
    import importlib

    module, name = MODEL_CLASSES[architecture].split(":")
    return getattr(importlib.import_module(module), name)


def config_model_class(hf_config):
    """The adapter class serving a checkpoint's HF config: its first `architectures` entry, or
    where it names none its `model_type`'s (Video-LLaVA when that is not LLaVA-NeXT-Video).
    Raises ValueError naming the architecture and those served."""
    architecture = (getattr(hf_config, "architectures", None) or [
        "LlavaNextVideoForConditionalGeneration" if getattr(hf_config, "model_type", None) == LLAVA_NEXT_VIDEO_MODEL_TYPE
        else "VideoLlavaForConditionalGeneration"])[0]
    if architecture not in MODEL_CLASSES:
        raise ValueError(f"a {architecture} checkpoint; intp-vllm serves {', '.join(MODEL_CLASSES)}")
    return model_class(architecture)


def keep_rotary_in_compiled_graph(enforce_eager: bool) -> None:
    """Turn vLLM's AOT compile off for an engine with per-request RoPE scales, unless set.

    AOT compile (`VLLM_USE_AOT_COMPILE`, vLLM's default from torch 2.10) re-traces Dynamo's
    `query._base` (kernels/scaled_rotary.py, `split_from`) to None, and the per-request rotary op
    on qkv whole is then dropped from the compiled graph: no rotation at all
    (tests/test_compiled_engine.py); plain torch.compile keeps it. Set here, in the engine's
    config hook, the variable reaches the engine-core and worker processes started after it, and
    engines of other models keep vLLM's default. Raises ValueError when AOT compile is still on
    for a compiled engine (set to 1, or read by an earlier engine of this process)."""
    import os

    from intp_vllm.vllm_ext.internals import envs

    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if envs.VLLM_USE_AOT_COMPILE and not enforce_eager:
        raise ValueError(
            "VLLM_USE_AOT_COMPILE=1 drops intp's per-request rotary op from the compiled graph (no rotation); "
            "unset it (intp-vllm turns it off for its engines) or set it to 0 before vLLM starts its first engine "
            "in this process, or pass --enforce-eager, or a fixed --factor")


class IntpConfigHook:
    """Per-architecture config hook (vLLM's MODELS_CONFIG_MAP): validate `intp`, size max_model_len,
    and on CPU size the KV cache from what the configuration needs (`cpu_memory.py`)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """Refuse options that would misread per-request scale codes; size the CPU KV cache."""
        from intp_vllm.core.config import TEXT_MARGIN_TOKENS
        from intp_vllm.vllm_ext.cpu_memory import size_cpu_kv_cache
        from intp_vllm.vllm_ext.pruning import VideoPruning

        model_config = vllm_config.model_config
        adapter = model_class(model_config.architecture)
        intp = adapter.intp_config(model_config.hf_config)
        if intp.factor == "auto":
            if vllm_config.speculative_config is not None:
                raise ValueError(
                    "--speculative-config cannot be used with intp factor 'auto': each request's RoPE scale "
                    "rides in its positions (request_scale.py), which vLLM's drafters read as KV-cache slots; "
                    "set a fixed --factor (e.g. --factor 4) or drop --speculative-config")
            keep_rotary_in_compiled_graph(vllm_config.model_config.enforce_eager)
        pruning = VideoPruning.of_server(model_config.multimodal_config)
        size_cpu_kv_cache(vllm_config, adapter.video_tokens(model_config.hf_config, intp.frames, pruning)
                          + TEXT_MARGIN_TOKENS)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        """Check that the running vLLM has all the plugin relies on (`internals.check_reliances`:
        at engine start, never at a first request), size max_model_len for intp.max_frames,
        declare the M-RoPE section that carries per-request scales (factor "auto"), and make our
        loader the video default (frames at intp.frames, resized for the tower). Raises
        VllmRelianceError for a vLLM that lacks a reliance, ValueError for a server frame count
        outside `intp`."""
        from intp_vllm.core.checks import PILLOW
        from intp_vllm.core.config import TEXT_MARGIN_TOKENS
        from intp_vllm.vllm_ext.internals import MROPE_SECTION_KEY, check_reliances
        from intp_vllm.vllm_ext.pruning import VideoPruning

        check_reliances(cli=False)
        hf_config = model_config.hf_config
        adapter = model_class(model_config.architecture)
        intp = adapter.intp_config(hf_config)
        most_video_tokens = adapter.max_video_tokens(hf_config, VideoPruning.of_server(model_config.multimodal_config))
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
            hf_config.text_config.rope_parameters[MROPE_SECTION_KEY] = [rotary_dim // 2]
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
                if intp.preprocess_device != PILLOW:
                    video_io.setdefault("preprocess_device", intp.preprocess_device)
        logger.info(
            "intp_vllm: %s; up to %d video tokens a request, max_model_len %d",
            intp.as_dict(),
            most_video_tokens,
            model_config.max_model_len,
        )


def prepare_chat_request(render_chat):
    """Wrap vLLM's `BaseRenderer.render_chat` (or `render_chat_async`) so that, for our model,
    a message's image_url frames become one video (`image_frames.frames_as_video`), a video
    attached again in a later turn counts once (`image_frames.one_video_each`), a video_url's
    `#t=` time range becomes the request's start/end (`video_range.py`), a request's
    `media_io_kwargs.video.num_frames` is its frame count unless it names `frames`
    (`IntpMultiModalProcessor.request_frames_kwargs`), and the videos of a chat request
    are fetched and decoded at the frame count the model's processor chooses for it
    (`IntpMultiModalProcessor.request_media_io_kwargs`).

    vLLM hands a video loader only `media_io_kwargs`, never the request's
    `mm_processor_kwargs`; without this a `video_url` is decoded at the server's count and
    a request's `frames` would sample from those. Other models' renderers are unchanged.
    """

    @functools.wraps(render_chat)
    def wrapper(self, conversations, chat_params, *args, prompt_extras=None, **kwargs):
        choose = getattr(self.mm_processor, "request_media_io_kwargs", None)
        if choose is not None:
            from intp_vllm.vllm_ext.internals import merge_media_io_kwargs
            from intp_vllm.vllm_ext.video_range import fragment_time_range

            conversations, chat_params, prompt_extras = _frames_as_video(self, conversations, chat_params,
                                                                         prompt_extras)
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
    """Conversations with image_url frames as one video each and videos attached again dropped
    (`image_frames.one_video_each`); chat params and prompt extras
    (which carry the request's `mm_processor_kwargs` to the processor) asking for all of their
    frames unless the request asked for a count (`image_frames.py`)."""
    from intp_vllm.vllm_ext.image_frames import frames_as_video, one_video_each
    from intp_vllm.vllm_ext.internals import envs
    from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME, ServeLimits
    from intp_vllm.vllm_ext.model import REQUEST_FRAMES_KWARG

    conversations, counts = frames_as_video(
        conversations, enabled=ServeLimits.from_env().image_frames,
        frame_limit=renderer.mm_processor.info.get_intp_config().frame_limit,
        connector_serves_frames=envs.VLLM_MEDIA_CONNECTOR == MEDIA_HOOK_NAME)
    conversations = one_video_each(conversations)
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


def processor_chat_template(checkpoint: str):
    """vLLM's chat-template fallback for a checkpoint directory whose template is only in its
    processor file `chat_template.json` (`{"chat_template": "..."}`): the template as a
    `.jinja` file in the temp directory (named by its hash), or None where there is none."""
    import hashlib
    import json
    import tempfile
    from pathlib import Path

    source = Path(checkpoint) / "chat_template.json"
    if not source.is_file():
        return None
    template = json.loads(source.read_text()).get("chat_template")
    if not isinstance(template, str):
        return None
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"intp_vllm_chat_template_{digest}.jinja"
    if not path.is_file():
        path.write_text(template)
    return path


RENDERER_WRAPPERS = {
    "render_chat": prepare_chat_request,
    "render_chat_async": prepare_chat_request,
    "_process_tokens": salt_with_request_scale,
    "_process_tokens_async": salt_with_request_scale_async,
}
"""vLLM `BaseRenderer` methods the plugin wraps, and how; each wrapper is a no-op for other models."""


def register() -> None:
    """The plugin's entry point: registers the models for their architectures (`MODEL_CLASSES`),
    the config hook, our video loader and media connector, the chat-template fallback, the
    renderer wrappers and the structured-output check; in an engine-core process, ends it with
    its parent (`engine.end_with_parent`). Idempotent."""
    from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE_PATH
    from intp_vllm.vllm_ext.internals import (
        MEDIA_CONNECTOR_REGISTRY,
        MODELS_CONFIG_MAP,
        VIDEO_LOADER_REGISTRY,
        BaseRenderer,
        ModelRegistry,
        get_chat_template_fallback_path,
        register_chat_template_fallback_path,
        warn_if_untested,
    )
    from intp_vllm.vllm_ext.engine import end_with_parent
    from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME, BoundedMediaConnector, IntpVideoLoader

    warn_if_untested()
    for name, wrap in RENDERER_WRAPPERS.items():
        if not getattr(getattr(BaseRenderer, name), "intp_vllm_wrapped", False):
            setattr(BaseRenderer, name, wrap(getattr(BaseRenderer, name)))
    _refuse_json_the_tokenizer_cannot_write()
    end_with_parent()
    VIDEO_LOADER_REGISTRY.register(MEDIA_HOOK_NAME)(IntpVideoLoader)
    MEDIA_CONNECTOR_REGISTRY.register(MEDIA_HOOK_NAME)(BoundedMediaConnector)  # used where VLLM_MEDIA_CONNECTOR says
    if get_chat_template_fallback_path(VIDEO_LLAVA_MODEL_TYPE, "") is None:
        register_chat_template_fallback_path(VIDEO_LLAVA_MODEL_TYPE, VIDEO_LLAVA_CHAT_TEMPLATE_PATH)
    if not getattr(processor_chat_template, "registered", False):  # vLLM warns when a fallback is replaced
        register_chat_template_fallback_path(LLAVA_NEXT_VIDEO_MODEL_TYPE, processor_chat_template)
        processor_chat_template.registered = True
    for architecture, model_cls in MODEL_CLASSES.items():
        MODELS_CONFIG_MAP[architecture] = IntpConfigHook
        ModelRegistry.register_model(architecture, model_cls)  # replaces vLLM's own LlavaNextVideo


def _refuse_json_the_tokenizer_cannot_write() -> None:
    """Wrap `SamplingParams.verify` (`structured_output.checked_verify`): a response_format our
    model's tokenizer cannot begin is a 400, not a 500 mid-generation."""
    from vllm import SamplingParams

    from intp_vllm.vllm_ext.structured_output import checked_verify

    if not getattr(SamplingParams.verify, "intp_vllm_wrapped", False):
        SamplingParams.verify = checked_verify(SamplingParams.verify)
