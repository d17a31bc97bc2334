"""A `video_url`'s W3C media-fragment time range (`...mp4#t=600,1200`) as the request's `start`/`end`.

Runs in the renderer before vLLM parses the messages (plugin.py), for the server and offline
`LLM.chat` alike: each video_url's `#t=` fragment is taken off its URL (a data: URL would not
decode with it, and an http server never sees fragments) and becomes `mm_processor_kwargs`
`start`/`end`, which the processor checks and hands to the loader with the frame count
(`core/frame_plan.py`), so the range is decided once, with the count. A fragment and
`mm_processor_kwargs` `start`/`end` in one request, or two different fragments, are a 400.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from intp_vllm.core.frame_plan import END_KEY, START_KEY, parse_time_fragment
from intp_vllm.vllm_ext.image_frames import FRAME_LIST_PREFIX


def fragment_time_range(conversations: Iterable[list[Mapping]], mm_kwargs: Mapping[str, object] | None
                        ) -> tuple[list[list[Mapping]], Mapping[str, object] | None]:
    """(conversations with `#t=` fragments taken off their video_url parts, `mm_kwargs` with
    their start/end added); `mm_kwargs` itself when no URL has one. Raises ValueError for a
    malformed fragment, fragments that differ, or a fragment beside mm_processor_kwargs start/end."""
    out, ranges = [], set()
    for conversation in conversations:
        messages = []
        for message in conversation:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, list):
                parts = [_without_fragment(part, ranges) for part in content]
                if any(new is not old for new, old in zip(parts, content)):
                    message = {**message, "content": parts}
            messages.append(message)
        out.append(messages)
    if not ranges:
        return out, mm_kwargs
    if len(ranges) > 1:
        raise ValueError(f"video_urls with different #t= time ranges {sorted(ranges, key=str)} in one call; "
                         "send each in its own call")
    given = [key for key in (START_KEY, END_KEY) if (mm_kwargs or {}).get(key) is not None]
    if given:
        raise ValueError(f"a video_url #t= time range and mm_processor_kwargs {', '.join(given)} conflict: give "
                         "the range one way")
    start, end = ranges.pop()
    extra = {key: value for key, value in ((START_KEY, start), (END_KEY, end)) if value is not None}
    return out, {**(mm_kwargs or {}), **extra}


def _without_fragment(part, ranges: set) -> object:
    """A video_url part without its `#t=` fragment (the part itself when it has none); adds the
    range to `ranges`."""
    if not isinstance(part, Mapping) or part.get("type") != "video_url":
        return part
    video = part.get("video_url")
    url = video.get("url") if isinstance(video, Mapping) else None
    if not isinstance(url, str) or url.startswith(FRAME_LIST_PREFIX):
        return part
    bare, start, end = parse_time_fragment(url)
    if bare == url:
        return part
    ranges.add((start, end))
    return {**part, "video_url": {**video, "url": bare}}
