"""How a chat's media parts become the model's one video: frames sent as `image_url` parts
(lmms-eval's default) served as one video, and a video attached again in later turns counted once.

Video-LLaVA's image path is not served (the image tower is skipped), and evaluation harnesses
send a video as N evenly spaced frames, each a base64 `image_url` part of one user message.
`frames_as_video` runs in the renderer before vLLM parses the messages (plugin.py): it puts
one `video_url` part in place of a message's N >= 2 image parts, whose URL lists the frames'
URLs (`FRAME_LIST_PREFIX`); the media connector (`media.BoundedMediaConnector`) fetches each
frame through vLLM's own image loading (data:, file:// and http(s) URLs, with the server's
host rules), resizes and crops it as a decoded video frame is, and hands the frames on, in
order, as one video. From there it is any video: INTP grouping, the request's RoPE scale.

Rules (each refusal a 400 naming the input): a single image is refused (Video-LLaVA's image
path is not served); image and video parts in one request are refused; more frames in a
message than `intp.max_frames` are refused. A request that does not set
`mm_processor_kwargs.frames` gets it set to the number of frames, so all of them are used; one
that sets it gets its frames sampled to that count as any video's. Every frame is resized
(short side) and centre-cropped to the tower's input, so frames of different sizes make one video.

Multi-turn chats (`one_video_each`, after the frames are videos): clients resend a video with
every turn. A video part whose video an earlier part already attached (the same `uuid`, or
the same URL: `file://localhost/p` is `file:///p`, the same frame list, the same data URL,
i.e. the same bytes) is dropped, so the model sees the video once, where it was first
attached, and the later turns' questions refer to it. Two different videos in one
conversation are refused: the model takes one video a prompt (docs/robustness.md,
"Multi-turn chats").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from intp_vllm.video.fetch import file_url_path, short_url
from intp_vllm.vllm_ext.client_messages import for_the_client

FRAME_LIST_PREFIX = "intp-frames:"
"""A `video_url` made of frames: this prefix, then the frames' URLs as a JSON list."""
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image_pil", "image_embeds"})
VIDEO_PART_TYPES = frozenset({"video_url", "video_embeds"})
URL_PART_TYPES = frozenset({"image_url", "input_image"})
"""Image parts that can be frames: those given by URL."""
DISABLED_HINT = "this server was started with --no-image-frames"
SEND_FRAMES_HINT = ("send a video_url, or a video's frames as 2 or more image_url parts of one message "
                    "(served as one video)")


def frame_list_url(urls: list[str]) -> str:
    """The `video_url` that stands for frames at `urls`, in order."""
    return FRAME_LIST_PREFIX + json.dumps(urls)


def frame_list_urls(url: str) -> list[str] | None:
    """The frames' URLs of a `frame_list_url`, or None for any other URL. Raises ValueError
    for a malformed list."""
    if not url.startswith(FRAME_LIST_PREFIX):
        return None
    try:
        urls = json.loads(url[len(FRAME_LIST_PREFIX):])
    except json.JSONDecodeError:
        urls = None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"video_url {url[:40]!r}... is not a list of frame URLs")
    return urls


def _part_type(part) -> tuple[str | None, object]:
    """(type, content) of a message part as vLLM's parser reads it; (None, None) for text or a
    part vLLM will reject itself."""
    from intp_vllm.vllm_ext.internals import VLLMValidationError, parse_chat_message_content_mm_part

    if not isinstance(part, dict):
        return None, None
    try:
        return parse_chat_message_content_mm_part(part)
    except VLLMValidationError:
        return None, None


def frames_as_video(conversations: Iterable[list[Mapping]], *, enabled: bool, frame_limit: int,
                    connector_serves_frames: bool) -> tuple[list[list[Mapping]], set[int]]:
    """`conversations` with each message's image_url frames replaced by one video part, and
    the frame counts found (one per conversation that had frames).

    `enabled` is the server's --image-frames; `frame_limit` is intp.max_frames;
    `connector_serves_frames` says whether the media connector in use is ours (only it reads
    `frame_list_url`s). Messages whose content is an iterator (as vLLM's request validation
    leaves it) come back with a list. Raises ValueError by the rules in this module's docstring.
    """
    out, counts = [], set()
    for conversation in conversations:
        conversation = [_materialize(message) for message in conversation]
        images = [(m, i) for m, message in enumerate(conversation) for i, part in enumerate(_parts(message))
                  if _part_type(part)[0] in IMAGE_PART_TYPES]
        if images:
            _check_frames(conversation, images, enabled, connector_serves_frames)
            for m in sorted({m for m, _ in images}, reverse=True):
                frames = [i for n, i in images if n == m]
                counts.add(_check_message_frames(conversation[m], frames, frame_limit))
                conversation = _replace_frames(conversation, m, frames)
        out.append(conversation)
    return out, counts


def one_video_each(conversations: Iterable[list[Mapping]]) -> list[list[Mapping]]:
    """`conversations` (lists of messages, frames already made videos by `frames_as_video`)
    with every video part that attaches a video an earlier part attached dropped (same `uuid`
    or same URL, `video_identity`). Raises ValueError for a conversation with two different
    videos, naming them."""
    out = []
    for conversation in conversations:
        conversation = [_materialize(message) for message in conversation]
        first, seen, drop = None, set(), set()
        for m, message in enumerate(conversation):
            for i, part in enumerate(_parts(message)):
                keys = video_identity(part)
                if keys is None:
                    continue
                if first is None:
                    first, seen = (m, part), set(keys)
                elif keys & seen:
                    seen |= keys
                    drop.add((m, i))
                else:
                    raise for_the_client(ValueError(_two_videos(first, (m, part))))
        out.append([message if not any(n == m for n, _ in drop) else
                    {**message, "content": [p for i, p in enumerate(message["content"]) if (m, i) not in drop]}
                    for m, message in enumerate(conversation)])
    return out


def video_identity(part) -> set[str] | None:
    """What identifies a video part's video: its `uuid` and its URL (a file URL by its
    normalised path, without touching the file system); None for a part that is not a video.
    A video given without a URL or uuid (embeddings) is its own."""
    kind, content = _part_type(part)
    if kind not in VIDEO_PART_TYPES:
        return None
    keys = {f"uuid:{part['uuid']}"} if part.get("uuid") else set()
    if isinstance(content, str):
        keys.add(f"url:{_normalised_url(content)}")
    return keys or {f"part:{id(part)}"}


def _normalised_url(url: str) -> str:
    if url[:5].lower() == "file:":
        try:
            return "file://" + os.path.normpath(file_url_path(url))
        except ValueError:  # refused by the media connector, with its reason
            return url
    return url


def _two_videos(first: tuple[int, Mapping], second: tuple[int, Mapping]) -> str:
    def name(m: int, part: Mapping) -> str:
        content = _part_type(part)[1]
        if isinstance(content, str) and (frames := frame_list_urls(content)) is not None:
            what = f"{len(frames)} image_url frames"
        else:
            what = f"video_url {short_url(content)}" if isinstance(content, str) else f"a {part.get('type')} part"
        return f"{what} in message {m + 1}"

    return (f"this conversation attaches two different videos ({name(*first)}, {name(*second)}): this model takes "
            "one video a prompt (a video attached again in a later turn, by the same URL or uuid, counts once); to ask "
            "about two videos, ask about each in its own request, or join them into one video file (one after the "
            "other) and send that")


def _materialize(message):
    content = message.get("content") if isinstance(message, Mapping) else None
    if content is None or isinstance(content, (str, list)):
        return message
    return {**message, "content": list(content)}


def _parts(message) -> list:
    content = message.get("content") if isinstance(message, Mapping) else None
    return content if isinstance(content, list) else []


def _check_frames(conversation, images, enabled: bool, connector_serves_frames: bool) -> None:
    if not enabled:
        raise ValueError(f"image parts are not served: {DISABLED_HINT}; send the video as a video_url")
    videos = sum(_part_type(part)[0] in VIDEO_PART_TYPES for message in conversation for part in _parts(message))
    if videos:
        raise ValueError(f"a request has {len(images)} image part(s) and {videos} video part(s): this model takes "
                         "one video a request, as a video_url or as its frames (image_url parts), not both")
    if not connector_serves_frames:
        raise ValueError("image_url frames are served as one video by `intp-vllm serve` (its media connector, "
                         "VLLM_MEDIA_CONNECTOR=intp_vllm); offline, pass the frames as one video array, "
                         "multi_modal_data={'video': frames}")


def _check_message_frames(message, frames: list[int], frame_limit: int) -> int:
    """The frame count of one message's image parts `frames` (their indices); raises ValueError
    by the module's rules."""
    if len(frames) == 1:
        raise ValueError(f"a single image is not served: Video-LLaVA's image path is not (only its video "
                         f"path is); {SEND_FRAMES_HINT}")
    if len(frames) > frame_limit:
        raise ValueError(f"{len(frames)} image_url frames: at most {frame_limit} frames are served a request "
                         "(intp.max_frames, the server's --max-frames); send fewer frames")
    for i in frames:
        kind, content = _part_type(message["content"][i])
        if kind not in URL_PART_TYPES or not isinstance(content, str):
            raise ValueError(f"image part {i} of a message of frames is a {kind} part without a URL; frames are "
                             "served from image_url parts with a url (data:, http(s) or file://)")
    return len(frames)


def _replace_frames(conversation, m: int, frames: list[int]) -> list:
    """The conversation with message `m`'s frames (part indices) one video part where its first frame was."""
    message = conversation[m]
    video = {"type": "video_url",
             "video_url": {"url": frame_list_url([_part_type(message["content"][i])[1] for i in frames])}}
    content = [video if i == frames[0] else part for i, part in enumerate(message["content"])
               if i == frames[0] or i not in frames]
    return [*conversation[:m], {**message, "content": content}, *conversation[m + 1:]]
