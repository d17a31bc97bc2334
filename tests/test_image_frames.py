"""A video sent as its frames, one image_url part each (lmms-eval's default), served as one video.

The message rewrite and the frame loader are checked directly; a live `intp-vllm serve` then
shows the served answer equals the one for the same frames sent as a lossless video, with the
frames in order (reversed frames answer otherwise), and that bad frame lists are 4xx.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import VideoLimits, write_video
from intp_vllm.video.preprocess import ClipPreprocessConfig, resize_and_crop
from intp_vllm.vllm_ext.image_frames import (FRAME_LIST_PREFIX, frame_list_url, frame_list_urls, frames_as_video,
                                             one_video_each)
from intp_vllm.vllm_ext.media import FrameImageIO, ServeLimits, frames_video

QUESTION = "What is happening in this video?"
SERVER_FRAMES = 8
MAX_FRAMES = 24
TOKENS_PER_FRAME = 17  # the tiny checkpoint: (56 / 14)^2 patches + CLS


def png_url(frame: np.ndarray, image_format: str = "PNG") -> str:
    """A frame as lmms-eval sends it: a base64 data URL of the encoded image."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def frames_message(urls: list[str], text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*(image_part(url) for url in urls), {"type": "text", "text": text}]}


def rewrite(conversation, enabled=True, frame_limit=MAX_FRAMES, connector_serves_frames=True):
    return frames_as_video([conversation], enabled=enabled, frame_limit=frame_limit,
                           connector_serves_frames=connector_serves_frames)


# ------------------------------------------------------------------------------ the message rewrite


def test_a_messages_frames_become_one_video_part_where_the_first_frame_was():
    urls = ["data:image/png;base64,AAAA", "http://example.com/1.jpg", "file:///data/2.png"]
    message = {"role": "user", "content": [{"type": "text", "text": "Before."}, *(image_part(u) for u in urls),
                                           {"type": "text", "text": "After."}]}
    system = {"role": "system", "content": "Be brief."}
    (conversation,), counts = rewrite([system, message])
    assert counts == {3}
    assert conversation[0] is system
    content = conversation[1]["content"]
    assert [part["type"] for part in content] == ["text", "video_url", "text"]
    assert frame_list_urls(content[1]["video_url"]["url"]) == urls
    assert message["content"][1]["type"] == "image_url"  # the request itself is left as it was


def test_the_simple_image_url_form_and_iterator_content_are_read_as_frames():
    """vLLM's request validation leaves content as a one-shot iterator; it comes back a list."""
    urls = ["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"]
    message = {"role": "user", "content": iter([{"image_url": urls[0]}, {"image_url": {"url": urls[1]}},
                                                {"type": "text", "text": QUESTION}])}
    (conversation,), counts = rewrite([message])
    assert counts == {2}
    assert frame_list_urls(conversation[0]["content"][0]["video_url"]["url"]) == urls


def test_requests_without_images_are_unchanged():
    conversation = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///a.mp4"}},
                                                 {"type": "text", "text": QUESTION}]}]
    (out,), counts = rewrite(conversation)
    assert out == conversation and counts == set()


FRAME = "data:image/png;base64,AAAA"


@pytest.mark.parametrize("conversation, options, message", [
    ([frames_message([FRAME])], {}, "a single image is not served: Video-LLaVA's image path is not"),
    ([frames_message([FRAME] * 2), {"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file:///a.mp4"}}]}], {},
     r"2 image part\(s\) and 1 video part\(s\).*not both"),
    ([frames_message([FRAME] * (MAX_FRAMES + 1))], {},
     f"{MAX_FRAMES + 1} image_url frames: at most {MAX_FRAMES} frames are served a request"),
    ([frames_message([FRAME] * 2)], {"enabled": False}, "image parts are not served: .*--no-image-frames"),
    ([{"role": "user", "content": [image_part(FRAME), {"type": "image_embeds", "image_embeds": "xx"}]}], {},
     "image part 1 of a message of frames is a image_embeds part without a URL"),
    ([frames_message([FRAME] * 2)], {"connector_serves_frames": False},
     r"served as one video by `intp-vllm serve`.*multi_modal_data=\{'video': frames\}"),
], ids=["single-image", "images-and-video", "too-many", "disabled", "embeds", "offline"])
def test_frame_lists_outside_the_rules_are_refused_naming_why(conversation, options, message):
    with pytest.raises(ValueError, match=message):
        rewrite(conversation, **options)


# ------------------------------------------------------------------------------ multi-turn chats


def video_turn(url: str, text: str, uuid: str | None = None) -> dict:
    part = {"type": "video_url", "video_url": {"url": url}, **({"uuid": uuid} if uuid else {})}
    return {"role": "user", "content": [part, {"type": "text", "text": text}]}


ANSWER = {"role": "assistant", "content": "A red square."}


@pytest.mark.parametrize("first, again", [
    (video_turn("file:///media/clip.mp4", "What?"), video_turn("file:///media/clip.mp4", "And then?")),
    (video_turn("file:///media/clip.mp4", "What?"), video_turn("file://localhost/media/./clip.mp4", "And then?")),
    (video_turn("data:video/mp4;base64,AAAA", "What?"), video_turn("data:video/mp4;base64,AAAA", "And then?")),
    (video_turn("https://example.com/a.mp4", "What?", uuid="v1"),
     video_turn("https://cdn.example.com/a.mp4", "And then?", uuid="v1")),
    (frames_message([FRAME, FRAME + "B"], "What?"), frames_message([FRAME, FRAME + "B"], "And then?")),
], ids=["same-url", "file-localhost", "same-data-url", "same-uuid", "same-frames"])
def test_a_video_attached_again_in_a_later_turn_is_one_video_where_it_was_first_attached(first, again):
    system = {"role": "system", "content": "Be brief."}
    conversations, counts = rewrite([system, first, ANSWER, again])
    [conversation] = one_video_each(conversations)
    assert [[part["type"] for part in m["content"]] if isinstance(m["content"], list) else "text"
            for m in conversation] == ["text", ["video_url", "text"], "text", ["text"]]
    assert conversation[3]["content"][0]["text"] == "And then?"
    assert conversation[1]["content"][0] == conversations[0][1]["content"][0]  # the first attachment, unchanged


@pytest.mark.parametrize("second, named", [
    (video_turn("file:///media/other.mp4", "And this one?"), "video_url 'file:///media/other.mp4' in message 3"),
    (video_turn("file:///media/clip.mp4", "And this one?", uuid="other"), None),
    (frames_message([FRAME, FRAME], "And these?"), None),
], ids=["other-url", "uuid-and-url", "frames"])
def test_two_different_videos_in_a_conversation_are_refused_saying_how_to_ask_about_two(second, named):
    first = video_turn("file:///media/clip.mp4", "What?", uuid="v1")
    if second["content"][0]["type"] == "image_url":
        with pytest.raises(ValueError, match=r"2 image part\(s\) and 1 video part\(s\)"):
            rewrite([first, ANSWER, second])
        return
    conversations, _ = rewrite([first, ANSWER, second])
    if named is None:  # the same URL under another uuid: the URL says it is the same video
        assert len(one_video_each(conversations)[0][2]["content"]) == 1
        return
    with pytest.raises(ValueError) as refused:
        one_video_each(conversations)
    assert str(refused.value) == (
        f"this conversation attaches two different videos (video_url 'file:///media/clip.mp4' in message 1, {named}): "
        "this model takes one video a prompt (a video attached again in a later turn, by the same URL or uuid, counts "
        "once); to ask about two videos, ask about each in its own request, or join them into one video file (one "
        "after the other) and send that")


def test_different_frame_lists_in_two_turns_are_two_videos():
    conversations, counts = rewrite([frames_message([FRAME, FRAME], "What?"), ANSWER,
                                     frames_message([FRAME, FRAME, FRAME], "And these?")])
    assert counts == {2, 3}
    with pytest.raises(ValueError, match=r"two different videos \(2 image_url frames in message 1, 3 image_url "
                       r"frames in message 3\)"):
        one_video_each(conversations)


@pytest.mark.parametrize("url", [FRAME_LIST_PREFIX + "[]", FRAME_LIST_PREFIX + "{", FRAME_LIST_PREFIX + "[1, 2]"])
def test_a_malformed_frame_list_is_refused(url):
    with pytest.raises(ValueError, match="is not a list of frame URLs"):
        frame_list_urls(url)


def test_other_urls_are_not_frame_lists():
    assert frame_list_urls("https://example.com/clip.mp4") is None
    assert frame_list_urls(frame_list_url(["a", "b"])) == ["a", "b"]


def test_the_serve_flag_reaches_the_limits_every_api_server_reads(monkeypatch):
    from intp_vllm.apps.cli import build_parser
    from intp_vllm.vllm_ext.media import LIMITS_ENV, install_media_limits

    for name in (LIMITS_ENV, "VLLM_MEDIA_CONNECTOR", "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test: later engines see no limits
        monkeypatch.delenv(name)
    for flags, expected in (([], True), (["--no-image-frames"], False)):
        args, _ = build_parser().parse_known_args(["serve", "/models/x", *flags])
        limits = ServeLimits.from_args(args, {})
        assert limits.image_frames is expected
        install_media_limits(limits)
        assert ServeLimits.from_env() == limits


# ------------------------------------------------------------------------------ the frame loader

TOWER = ClipPreprocessConfig(shortest_edge=56, crop_size=56)


def encoded(frame: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, image_format)
    return buffer.getvalue()


def test_a_frame_is_resized_and_cropped_as_a_decoded_video_frame():
    frame = moving_shapes_video(num_frames=1, height=90, width=160, seed=3)[0]
    loaded = FrameImageIO(VideoLimits(), TOWER, "frame 0").load_bytes(encoded(frame))
    assert loaded.dtype == np.uint8 and loaded.shape == (56, 56, 3)
    np.testing.assert_array_equal(loaded, resize_and_crop(frame, TOWER))


def test_frames_of_different_sizes_make_one_video():
    sizes = [(90, 160), (56, 56), (200, 120)]
    frames = [moving_shapes_video(num_frames=1, height=h, width=w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    io_ = FrameImageIO(VideoLimits(), TOWER, "frame")
    video, metadata = frames_video([io_.load_bytes(encoded(f)) for f in frames])
    assert video.shape == (3, 56, 56, 3) and metadata["frames_indices"] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"frames of different sizes \['56x56', '160x90'\]"):
        frames_video([FrameImageIO(VideoLimits(), None, "f").load_bytes(encoded(f)) for f in frames[:2]])


def test_a_frame_over_the_limits_is_refused_before_it_is_decoded():
    frame = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"frame 3 is 100x60 \(6000 pixels\); at most 5000 pixels a frame"):
        FrameImageIO(VideoLimits(max_frame_pixels=5000), TOWER, "frame 3").load_bytes(encoded(frame))
    data = encoded(frame)
    with pytest.raises(ValueError, match=f"frame 3 is {len(data)} bytes; at most 100 bytes"):
        FrameImageIO(VideoLimits(max_bytes=100), TOWER, "frame 3").load_bytes(data)


@pytest.mark.parametrize("data, message", [(b"not an image at all", "frame 0 is not an image"),
                                           (b"\x89PNG\r\n\x1a\n" + bytes(40), "frame 0 is not an image")])
def test_bytes_that_are_not_an_image_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        FrameImageIO(VideoLimits(), TOWER, "frame 0").load_bytes(data)


def test_broken_base64_is_refused():
    with pytest.raises(ValueError, match="frame 0 is not valid base64"):
        FrameImageIO(VideoLimits(), TOWER, "frame 0").load_base64("image/png", "abc*def")


# ------------------------------------------------------------------------------ a live server


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image-frames-media")


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_dir):
    from intp_vllm_benchmarks.load_test import serve

    args = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0",
            "--frames", str(SERVER_FRAMES), "--max-frames", str(MAX_FRAMES), "--trust-request-mm-kwargs",
            "--allowed-local-media-path", str(media_dir)]  # no memory flag: the plugin sizes the KV cache
    with serve(tiny_model_dir, args) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def model(server) -> str:
    from intp_vllm_benchmarks.load_test import served_model

    return served_model(server)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return moving_shapes_video(num_frames=16, height=72, width=100, seed=11)


def chat(server: str, model: str, messages: list[dict], **extra) -> tuple[int, dict]:
    body = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0.0, "logprobs": True, **extra}
    response = requests.post(f"{server}/v1/chat/completions", json=body, timeout=180)
    return response.status_code, response.json()


def served(server, model, messages, **extra) -> dict:
    status, reply = chat(server, model, messages, **extra)
    assert status == 200, reply
    return reply


def answer(reply: dict) -> tuple[str, list[float]]:
    return (reply["choices"][0]["message"]["content"],
            [token["logprob"] for token in reply["choices"][0]["logprobs"]["content"]])


def lossless_video_url(frames: np.ndarray, path: Path) -> str:
    write_video(path, frames)  # .mkv: FFV1 in RGB, decoded bit for bit
    return "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()


def video_message(url: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                        {"type": "text", "text": QUESTION}]}


@pytest.mark.engine
def test_frames_as_images_are_served_as_the_same_frames_sent_as_a_lossless_video(server, model, frames, media_dir):
    """16 PNG frames (more than the server's 8, within --max-frames): all are used, in order, and
    the answer and its logprobs equal those of the same 16 frames as a lossless video; the
    frames reversed answer otherwise (the negative control)."""
    as_images = served(server, model, [frames_message([png_url(f) for f in frames])])
    as_video = served(server, model, [video_message(lossless_video_url(frames, media_dir / "frames.mkv"))],
                      mm_processor_kwargs={"frames": len(frames)})
    eight = served(server, model, [video_message(lossless_video_url(frames, media_dir / "frames.mkv"))])
    assert as_images["usage"]["prompt_tokens"] == as_video["usage"]["prompt_tokens"]
    assert as_images["usage"]["prompt_tokens"] == eight["usage"]["prompt_tokens"] + 8 * TOKENS_PER_FRAME
    text, logprobs = answer(as_images)
    assert text == answer(as_video)[0]
    np.testing.assert_allclose(logprobs, answer(as_video)[1], atol=1e-4)
    reversed_text, reversed_logprobs = answer(served(server, model, [frames_message([png_url(f) for f in frames[::-1]])]))
    assert reversed_text != text or not np.allclose(reversed_logprobs, logprobs, atol=1e-2)


@pytest.mark.engine
def test_an_lmms_eval_request_with_a_system_prompt_is_served(server, model, frames, media_dir):
    """What lmms-eval's openai backend sends by default (JPEG frames, then the question) after a
    system message, through the openai client; mm_processor_kwargs.frames samples the frames as
    it would a video's."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "system", "content": "Answer briefly."},
                frames_message([png_url(f, "JPEG") for f in frames[:12]])]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.0)
    assert reply.choices[0].message.content
    sampled = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0.0,
                                             extra_body={"mm_processor_kwargs": {"frames": 8}})
    # 12 frames are padded to 16, whole 8-frame encoder clips (the last frame repeated)
    assert reply.usage.prompt_tokens == sampled.usage.prompt_tokens + 8 * TOKENS_PER_FRAME


@pytest.mark.engine
def test_frames_of_different_sizes_are_each_resized_like_a_video_frame(server, model, media_dir):
    """Each frame is resized (short side) and centre-cropped to the tower's input, as a decoded
    video frame is: the answer equals that of a lossless video of the frames so resized."""
    sizes = [(72, 100), (120, 90), (56, 56), (200, 320), (64, 64), (90, 160), (100, 72), (58, 61)]
    frames = [moving_shapes_video(num_frames=1, height=h, width=w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    resized = np.stack([resize_and_crop(f, TOWER) for f in frames])
    as_images = served(server, model, [frames_message([png_url(f) for f in frames])])
    as_video = served(server, model, [video_message(lossless_video_url(resized, media_dir / "resized.mkv"))])
    assert answer(as_images)[0] == answer(as_video)[0]
    np.testing.assert_allclose(answer(as_images)[1], answer(as_video)[1], atol=1e-4)


@pytest.mark.engine
@pytest.mark.parametrize("urls, status, message", [
    (lambda f, d: [png_url(f[0])], 400, "a single image is not served"),
    (lambda f, d: [png_url(x) for x in np.concatenate([f, f])[:MAX_FRAMES + 1]], 400,
     f"{MAX_FRAMES + 1} image_url frames: at most {MAX_FRAMES} frames"),
    (lambda f, d: [png_url(f[0]), "data:image/png;base64," + base64.b64encode(b"garbage").decode()], 400,
     r"the 2 image_url frames: image_url frame 1 \('data:image/png;base64,Z2FyYmFnZQ=='\) is not an image"),
    (lambda f, d: [png_url(f[0]), "file:///etc/hostname"], 400, "must be a subpath of `--allowed-local-media-path"),
    (lambda f, d: [png_url(f[0]), "http://127.0.0.1:9/frame.png"], 400,
     "refused: 127.0.0.1, a loopback address"),
    (lambda f, d: [png_url(f[0]), f"file://{d}/missing.png"], 422, "could not be fetched: FileNotFoundError"),
], ids=["single-image", "too-many", "not-an-image", "file-outside", "loopback-http", "missing-file"])
def test_bad_frame_lists_are_4xx_and_the_server_goes_on(server, model, frames, media_dir, urls, status, message):
    got, reply = chat(server, model, [frames_message(urls(frames, media_dir))])
    assert got == status, reply
    assert re.search(message, reply["error"]["message"]), reply["error"]["message"]
    served(server, model, [frames_message([png_url(f) for f in frames[:8]])])


@pytest.mark.engine
def test_frames_from_files_and_data_urls_mix(server, model, frames, media_dir):
    """file:// frames under the allowed directory read like data URLs of the same images."""
    for i, frame in enumerate(frames[:8]):
        Image.fromarray(frame).save(media_dir / f"frame{i}.png")
    mixed = [f"file://{media_dir}/frame{i}.png" if i % 2 else png_url(frame) for i, frame in enumerate(frames[:8])]
    assert answer(served(server, model, [frames_message(mixed)])) == \
        answer(served(server, model, [frames_message([png_url(f) for f in frames[:8]])]))
