"""Video-LLaVA's prompt format: the video placeholder, the one-video prompt and the chat template.

One home for the production prompt, used by the model's processor, `serve`, `batch`, the
plugin (vLLM's chat-template fallback) and the research tools that build checkpoints.
"""

from __future__ import annotations

from pathlib import Path

VIDEO_PLACEHOLDER = "<video>"
"""The token a prompt holds where a video goes; the processor expands it to the video's tokens."""

VIDEO_LLAVA_CHAT_TEMPLATE_PATH = Path(__file__).with_name("video_llava_chat_template.jinja")
"""Vicuna v1 style, what Video-LLaVA was trained on: `{system} USER: <video>\\n{question} ASSISTANT:
{answer}</s>USER: ...`. Content may be a string or a list of parts (text, video, video_url), in
any role; a system message is optional, turns may be text only. Written into every checkpoint
`research.tiny_model` makes, passed by `intp-vllm serve`, and registered by the plugin as vLLM's
fallback for `video_llava` checkpoints that have none."""
VIDEO_LLAVA_CHAT_TEMPLATE = VIDEO_LLAVA_CHAT_TEMPLATE_PATH.read_text()

VIDEO_PROMPT = f"USER: {VIDEO_PLACEHOLDER}\n{{question}} ASSISTANT:"
"""A one-video question as the chat template renders it, for the offline `LLM.generate` API."""
