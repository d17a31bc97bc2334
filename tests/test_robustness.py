"""Hostile and heavy input against one live `intp-vllm serve` (real files, real HTTP).

Every bad request gets a 4xx whose message names the problem, and a valid request right
after it still succeeds; a burst beyond the in-flight limit gets 503s, not a hang; decoding
a long video holds only the sampled frames. Limits are set small so the cases stay cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from conftest import ENGINE_KV_BYTES
from intp_vllm.apps.serve import add_limit_arguments
from intp_vllm.vllm_ext.media import IntpVideoLoader, ServeLimits
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import VideoLimits, read_video, write_video
from intp_vllm_benchmarks.load_test import QUESTION, chat_request, run_load, serve, served_model
from test_fuzz_video import malformed_dref_mp4

pytestmark = pytest.mark.engine

MAX_FRAMES = 16
MAX_VIDEO_BYTES = 2_000_000
FETCH_TIMEOUT_S = 3
MAX_IN_FLIGHT = 8
LOCAL_HOST = "127.0.0.2"
"""The test http servers' address: loopback, fetched because the server allows this one network."""


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robustness-media")


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_dir):
    args = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(ENGINE_KV_BYTES),
            "--max-num-seqs", "4", "--seed", "0", "--allowed-local-media-path", str(media_dir),
            "--trust-request-mm-kwargs", "--max-frames", str(MAX_FRAMES), "--max-video-frames", str(MAX_FRAMES),
            "--max-video-bytes", str(MAX_VIDEO_BYTES), "--video-fetch-timeout", str(FETCH_TIMEOUT_S),
            "--max-in-flight-requests", str(MAX_IN_FLIGHT), "--allowed-media-networks", f"{LOCAL_HOST}/32"]
    with serve(tiny_model_dir, args) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def model(server) -> str:
    return served_model(server)


@pytest.fixture(scope="module")
def clip(media_dir) -> Path:
    return write_video(media_dir / "clip.mp4", moving_shapes_video(num_frames=24, height=72, width=100, seed=7))


@pytest.fixture(scope="module")
def silent_url():
    """An http server that accepts connections and never answers."""
    listener = socket.create_server((LOCAL_HOST, 0))
    held = []

    def accept_forever():
        try:
            while True:
                held.append(listener.accept()[0])
        except OSError:  # the listener was closed
            pass

    threading.Thread(target=accept_forever, daemon=True).start()
    yield f"http://{LOCAL_HOST}:{listener.getsockname()[1]}/clip.mp4"
    listener.close()
    for conn in held:
        conn.close()


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_request(model: str, url: str, text: str = QUESTION, videos: int = 1, **extra) -> dict:
    return {**chat_request(model, url, max_tokens=4, text=text, videos=videos), **extra}


def post(server: str, body: dict) -> tuple[int, dict]:
    response = requests.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    return response.status_code, response.json()


def assert_served(server: str, model: str, clip: Path) -> dict:
    status, reply = post(server, video_request(model, f"file://{clip}"))
    assert status == 200, reply
    return reply


# ------------------------------------------------------------------------------ hostile input
# Each builder gets (media_dir, clip) and returns (video_url, request extras).


def corrupt_mp4(media, clip):
    """A real mp4 header followed by garbage."""
    return data_url(clip.read_bytes()[:64] + np.random.default_rng(0).bytes(4000)), {}


def text_named_mp4(media, clip):
    (media / "notes.mp4").write_text("not a video\n" * 50)
    return f"file://{media / 'notes.mp4'}", {}


def zero_frame_mp4(media, clip):
    """What OpenCV writes when a writer is closed before any frame."""
    writer = cv2.VideoWriter(str(media / "empty.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 48))
    writer.release()
    return f"file://{media / 'empty.mp4'}", {}


def eight_k_mp4(media, clip):
    """7680x4320: rejected from the header, before any frame is decoded."""
    write_video(media / "8k.mp4", np.zeros((1, 4320, 7680, 3), np.uint8))
    return f"file://{media / '8k.mp4'}", {}


def extreme_aspect_ratio(media, clip):
    """A few KB that would resize to 168000x224 per frame: refused from the header."""
    write_video(media / "thin.mp4", np.zeros((8, 4, 3000, 3), np.uint8))
    return f"file://{media / 'thin.mp4'}", {}


def not_a_video_media_type(media, clip):
    """mp4 bytes labelled as a PNG image."""
    return "data:image/png;base64," + base64.b64encode(clip.read_bytes()).decode(), {}


def too_many_decoded_frames(media, clip):
    return f"file://{clip}", {"media_io_kwargs": {"video": {"num_frames": MAX_FRAMES + 1}}}


def all_frames_requested(media, clip):
    """num_frames=-1 makes vLLM's own loader decode the whole video."""
    return f"file://{clip}", {"media_io_kwargs": {"video": {"num_frames": -1}}}


def conflicting_frame_counts(media, clip):
    return f"file://{clip}", {"media_io_kwargs": {"video": {"num_frames": 16}}, "mm_processor_kwargs": {"frames": 12}}


def too_many_processed_frames(media, clip):
    return f"file://{clip}", {"mm_processor_kwargs": {"frames": MAX_FRAMES + 1}}


def rate_cap_over_max(media, clip):
    return f"file://{clip}", {"mm_processor_kwargs": {"fps": 1, "max_frames": MAX_FRAMES + 1}}


def scale_code_from_the_request(media, clip):
    """The RoPE scale code is the processor's to decide."""
    return f"file://{clip}", {"mm_processor_kwargs": {"rope_scale_code": 0}}


def unsupported_loader_option(media, clip):
    return f"file://{clip}", {"media_io_kwargs": {"video": {"max_duration": 2}}}


def rate_as_loader_option(media, clip):
    return f"file://{clip}", {"media_io_kwargs": {"video": {"fps": 2}}}


def preprocess_device_from_the_request(media, clip):
    """Where frames are resized is the server's to decide."""
    return f"file://{clip}", {"media_io_kwargs": {"video": {"preprocess_device": "cpu"}}}


def outside_allowed_dir(media, clip):
    return "file:///etc/passwd", {}


def dot_dot_out_of_allowed_dir(media, clip):
    return f"file://{media}/../{media.name}-outside.mp4", {}


def symlink_out_of_allowed_dir(media, clip):
    outside = write_video(media.parent / "outside.mp4", moving_shapes_video(num_frames=8, height=32, width=32))
    link = media / "link.mp4"
    if not link.is_symlink():
        link.symlink_to(outside)
    return f"file://{link}", {}


def missing_file(media, clip):
    return f"file://{media / 'missing.mp4'}", {}


def broken_base64(media, clip):
    return "data:video/mp4;base64,AAAA%%%%" + base64.b64encode(clip.read_bytes()).decode(), {}


def data_url_not_base64(media, clip):
    """vLLM itself answers this with a 501."""
    return "data:video/mp4,hello", {}


def jpeg_frame_list(media, clip):
    """vLLM decodes these itself, with no frame or pixel limit."""
    return "data:video/jpeg;base64,AAAA", {}


def file_over_byte_limit(media, clip):
    (media / "big.mp4").write_bytes(bytes(MAX_VIDEO_BYTES + 1))
    return f"file://{media / 'big.mp4'}", {}


def data_url_over_byte_limit(media, clip):
    return data_url(bytes(MAX_VIDEO_BYTES + 1)), {}


def body_over_request_limit(media, clip):
    """Refused from Content-Length, before the body is read."""
    return data_url(bytes(2 * MAX_VIDEO_BYTES)), {}


HOSTILE = [
    pytest.param(corrupt_mp4, 400, r"video bytes \(4064 bytes\) (is not a video PyAV can open|failed to decode)",
                 id="corrupt-mp4"),
    pytest.param(text_named_mp4, 400, r"video bytes \(600 bytes\) is not a video PyAV can open \(Invalid data found "
                 r"when processing input\): expected a video file \(mp4/mov/3gp, mkv/webm, avi", id="text-named-mp4"),
    pytest.param(zero_frame_mp4, 400, r"video bytes \(\d+ bytes\) has no video stream", id="zero-frames"),
    pytest.param(extreme_aspect_ratio, 400, r"3000x4 frames \(aspect ratio 750:1\); at most 200:1 is allowed",
                 id="aspect-ratio"),
    pytest.param(not_a_video_media_type, 400, "expected a base64 encoded video file.*got data:image/png;base64",
                 id="data-url-image-type"),
    pytest.param(eight_k_mp4, 400, r"7680x4320 frames \(33177600 pixels\); at most 2073600 pixels", id="8k"),
    pytest.param(too_many_decoded_frames, 400, r"media_io_kwargs.video.num_frames=17: expected an integer from 1 "
                 r"to 16 \(intp.max_frames\)", id="num-frames-over-max"),
    pytest.param(all_frames_requested, 400, "media_io_kwargs.video.num_frames=-1: expected an integer from 1 to 16",
                 id="all-frames"),
    pytest.param(conflicting_frame_counts, 400, r"media_io_kwargs.video.num_frames=16 conflicts with 12 frames: a "
                 r"request's frame count is mm_processor_kwargs.frames", id="num-frames-conflict"),
    pytest.param(too_many_processed_frames, 400, r"frames=17: expected an integer from 1 to 16",
                 id="processor-frames-over-max"),
    pytest.param(rate_cap_over_max, 400, r"mm_processor_kwargs.max_frames=17: expected an integer from 1 to 16, the "
                 r"server's --max-frames", id="request-max-frames-over-max"),
    pytest.param(scale_code_from_the_request, 400, r"mm_processor_kwargs.rope_scale_code is set by the server",
                 id="scale-code-from-request"),
    pytest.param(unsupported_loader_option, 400, r"\['max_duration'\] are not supported", id="loader-option"),
    pytest.param(rate_as_loader_option, 400, r"media_io_kwargs.video \['fps'\]: a request's rate and time range are "
                 r"mm_processor_kwargs \['fps', 'start', 'end', 'max_frames'\]", id="rate-as-loader-option"),
    pytest.param(preprocess_device_from_the_request, 400, r"media_io_kwargs.video.preprocess_device='cpu': where "
                 r"frames are resized is the server's setting \(--preprocess-device, here 'pillow'\)",
                 id="preprocess-device-from-request"),
    pytest.param(outside_allowed_dir, 400, "must be a subpath of `--allowed-local-media-path", id="outside"),
    pytest.param(dot_dot_out_of_allowed_dir, 400, "must be a subpath of `--allowed-local-media-path", id="dot-dot"),
    pytest.param(symlink_out_of_allowed_dir, 400, "must be a subpath of `--allowed-local-media-path", id="symlink"),
    pytest.param(missing_file, 422, "could not be fetched: FileNotFoundError", id="missing-file"),
    pytest.param(broken_base64, 400, "video_url 'data:video/mp4;base64,AAAA%%%%.*base64", id="broken-base64"),
    pytest.param(data_url_not_base64, 400, "expected a base64 encoded video", id="data-url-not-base64"),
    pytest.param(jpeg_frame_list, 400, "video/jpeg frame lists are not accepted", id="jpeg-frame-list"),
    pytest.param(file_over_byte_limit, 400, f"{MAX_VIDEO_BYTES + 1} bytes; at most {MAX_VIDEO_BYTES} bytes",
                 id="file-too-big"),
    pytest.param(data_url_over_byte_limit, 400, f"{MAX_VIDEO_BYTES + 1} bytes; at most {MAX_VIDEO_BYTES} bytes",
                 id="data-url-too-big"),
    pytest.param(body_over_request_limit, 413, "request body of .* bytes is over this server's limit",
                 id="body-too-big"),
]


@pytest.mark.parametrize("build, status, message", HOSTILE)
def test_hostile_video_is_a_4xx_naming_the_problem_and_the_next_request_succeeds(
        server, model, media_dir, clip, build, status, message):
    url, extra = build(media_dir, clip)
    got, reply = post(server, video_request(model, url, **extra))
    assert got == status, reply
    assert re.search(message, reply["error"]["message"]), reply["error"]["message"]
    assert_served(server, model, clip)


def timed_post(server: str, body: dict) -> tuple[int, dict, float]:
    start = time.monotonic()
    status, reply = post(server, body)
    return status, reply, time.monotonic() - start


def test_eight_fifos_are_400s_at_once_and_the_next_video_is_answered_in_the_usual_time(server, model, media_dir, clip):
    """The field report: file:// naming a FIFO (opening it blocks until a writer comes) used to
    hold one of vLLM's 8 media threads forever; after 8, every video request was a 422. Now a
    FIFO is refused from its stat, never opened, and the client's own URL is in the message."""
    usual = min(timed_post(server, video_request(model, f"file://{clip}"))[2] for _ in range(3))
    fifos = [media_dir / f"pipe{i}.mp4" for i in range(8)]
    for fifo in fifos:
        if not fifo.exists():
            os.mkfifo(fifo)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fifos)) as pool:
        answers = list(pool.map(lambda fifo: timed_post(server, video_request(model, f"file://{fifo}")), fifos))
    for fifo, (status, reply, seconds) in zip(fifos, answers):
        assert status == 400 and seconds < FETCH_TIMEOUT_S, (status, reply, seconds)
        assert reply["error"]["message"] == (f"video_url 'file://{fifo}': is a FIFO (named pipe), not a regular file; "
                                             "only video files are read")
    health = requests.get(f"{server}/health", timeout=5)
    assert health.status_code == 200 and health.headers["x-intp-stuck-file-reads"] == "0/8"
    status, reply, seconds = timed_post(server, video_request(model, f"file://{clip}"))
    assert status == 200, reply
    assert seconds < min(FETCH_TIMEOUT_S, 3 * usual + 1.0), (seconds, usual)


def test_sockets_and_directories_are_400s_naming_the_kind_and_the_client_s_url(server, model, media_dir, clip):
    import socket as sockets

    listener = sockets.socket(sockets.AF_UNIX)
    path = media_dir / "sock.mp4"
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    (media_dir / "folder.mp4").mkdir(exist_ok=True)
    try:
        for name, kind in (("sock.mp4", "a socket"), ("folder.mp4", "a directory")):
            status, reply = post(server, video_request(model, f"file://{media_dir / name}"))
            assert status == 400 and reply["error"]["message"] == (
                f"video_url 'file://{media_dir / name}': is {kind}, not a regular file; only video files are read")
    finally:
        listener.close()
    assert_served(server, model, clip)


def test_file_localhost_urls_are_served_like_file_urls_without_a_host(server, model, clip):
    """RFC 8089: file://localhost/abs/path is file:///abs/path (vLLM read it as a relative path: a 422)."""
    status, reply = post(server, video_request(model, f"file://localhost{clip}"))
    assert status == 200, reply
    assert reply["choices"][0]["message"] == assert_served(server, model, clip)["choices"][0]["message"]
    status, reply = post(server, video_request(model, f"file://fileserver{clip}"))
    assert status == 400 and reply["error"]["message"] == (
        f"video_url 'file://fileserver{clip}': names host 'fileserver': file URLs name a path on this server, "
        "file:///abs/path or file://localhost/abs/path")


def test_error_messages_name_the_path_the_client_sent(server, model, media_dir):
    """vLLM's sanitiser makes paths `<path>` in error messages; the client sent the path, so ours
    come back whole (a missing file: 422; too big: 400)."""
    status, reply = post(server, video_request(model, f"file://{media_dir / 'missing.mp4'}"))
    assert status == 422 and reply["error"]["message"] == (
        f"video_url 'file://{media_dir / 'missing.mp4'}' could not be fetched: FileNotFoundError: No such file or "
        "directory (parameter=video_url)")
    (media_dir / "big.mp4").write_bytes(bytes(MAX_VIDEO_BYTES + 1))
    status, reply = post(server, video_request(model, f"file://{media_dir / 'big.mp4'}"))
    assert status == 400 and reply["error"]["message"].startswith(f"video_url 'file://{media_dir / 'big.mp4'}': is a "
                                                                  f"file of {MAX_VIDEO_BYTES + 1} bytes")


def test_a_streamed_request_refused_before_its_first_token_gets_the_status_and_body_of_an_unstreamed_one(
        server, model, clip):
    """vLLM checks sampling parameters once the stream has begun (a 200, then an error event);
    the server answers a streamed request it refuses with a 4xx, as an unstreamed one."""
    bad = video_request(model, f"file://{clip}", logit_bias={"100000": 5})  # a token id out of the vocabulary
    status, unstreamed = post(server, bad)
    assert status == 400, unstreamed
    response = requests.post(f"{server}/v1/chat/completions", json={**bad, "stream": True}, timeout=120)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["error"] == unstreamed["error"]
    response = requests.post(f"{server}/v1/chat/completions", json={**video_request(model, f"file://{clip}"),
                                                                    "stream": True}, timeout=120)
    assert response.status_code == 200 and response.text.startswith("data: ") and "data: [DONE]" in response.text


def test_json_response_format_is_served_when_the_tokenizer_can_write_json(server, model, clip):
    """The tiny checkpoint's byte-level tokenizer can begin '{': response_format is honoured
    (the refusal for a tokenizer that cannot: test_structured_output.py)."""
    for stream in (False, True):
        response = requests.post(f"{server}/v1/chat/completions", timeout=120, json={
            **video_request(model, f"file://{clip}"), "stream": stream, "response_format": {"type": "json_object"}})
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"] if not stream else "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in response.text.splitlines() if line.startswith("data: {"))
        assert text.lstrip().startswith("{"), text


def test_num_frames_alone_is_the_request_s_frame_count(server, model, clip):
    """What lmms-eval's pass_video_url sends: the video is read at num_frames, as with frames."""
    def prompt_tokens(extra: dict) -> int:
        status, reply = post(server, video_request(model, f"file://{clip}", **extra))
        assert status == 200, reply
        return reply["usage"]["prompt_tokens"]

    assert prompt_tokens({"media_io_kwargs": {"video": {"num_frames": 16}}}) \
        == prompt_tokens({"mm_processor_kwargs": {"frames": 16}}) > prompt_tokens({})


def chat(model: str, messages: list[dict]) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0.0}


def turn(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}]}


def test_a_video_attached_again_in_later_turns_is_one_video(server, model, clip):
    """Clients resend the attachment with every turn (vLLM alone: a 400, 'At most 1 video(s)'):
    the conversation is served as if the video came once, in the first turn."""
    url = f"file://{clip}"
    answer = {"role": "assistant", "content": "A red square."}
    system = {"role": "system", "content": "Answer in one word."}
    once = [system, turn(url, "What moves?"), answer, {"role": "user", "content": "Which way?"}]
    status, expected = post(server, chat(model, once))
    assert status == 200, expected
    for again in (url, f"file://localhost{clip}"):
        resent = [system, turn(url, "What moves?"), answer,
                  {"role": "user", "content": [{"type": "video_url", "video_url": {"url": again}},
                                               {"type": "text", "text": "Which way?"}]}]
        status, reply = post(server, chat(model, resent))
        assert status == 200, reply
        assert reply["usage"] == expected["usage"] and reply["choices"][0]["message"] == expected["choices"][0]["message"]
    status, reply = post(server, video_request(model, url, videos=2))  # twice in one message: once
    assert status == 200 and reply["usage"]["prompt_tokens"] == assert_served(server, model, clip)["usage"][
        "prompt_tokens"], reply


def two_videos_of_one_size(media_dir, stem: str, seeds: tuple[int, int]) -> tuple[bytes, bytes]:
    """Two MP4s of other frames padded to one size (trailing bytes after the moov are ignored):
    a file that changes behind a cache's back without changing its size."""
    first, other = (write_video(media_dir / f"{stem}-{seed}.mp4", moving_shapes_video(
        num_frames=24, height=72, width=100, seed=seed)).read_bytes() for seed in seeds)
    size = max(len(first), len(other))
    return first.ljust(size, b"\0"), other.ljust(size, b"\0")


def test_a_follow_up_question_about_an_unchanged_file_is_not_read_or_decoded_again(server, model, media_dir):
    """The decoded-video cache: while the file's inode, size and mtime are unchanged, the next
    turn gets the frames decoded for the first; touching the file makes the next one read it.
    Shown by swapping other frames into the file behind the cache's back, same size and mtime."""
    first, other = two_videos_of_one_size(media_dir, "cache", (21, 22))
    path = media_dir / "cached.mp4"
    path.write_bytes(first)
    (media_dir / "other.mp4").write_bytes(other)
    mtime = path.stat().st_mtime_ns
    status, turn_one = post(server, video_request(model, f"file://{path}"))
    assert status == 200, turn_one
    status, other_answer = post(server, video_request(model, f"file://{media_dir / 'other.mp4'}"))
    assert other_answer["choices"][0]["message"] != turn_one["choices"][0]["message"]  # the frames tell apart
    with open(path, "r+b") as file:  # other frames, same inode and size
        file.write(other)
    os.utime(path, ns=(mtime, mtime))
    status, turn_two = post(server, video_request(model, f"file://{path}", text=QUESTION))
    assert status == 200 and turn_two["choices"][0]["message"] == turn_one["choices"][0]["message"]
    os.utime(path)  # a changed file: read again
    status, turn_three = post(server, video_request(model, f"file://{path}"))
    assert status == 200 and turn_three["choices"][0]["message"] == other_answer["choices"][0]["message"]


def cache_lookups(server: str) -> dict[tuple[str, str], float]:
    """(source, result) -> the decoded-video cache's lookups so far, from the server's /metrics."""
    text = requests.get(f"{server}/metrics", timeout=10).text
    counts = {}
    for labels, value in re.findall(r"^intp_vllm:decoded_video_cache_lookups_total\{(.*)\} (\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="(\w*)"', labels))
        counts[label["source"], label["result"]] = float(value)
    return counts


def test_a_follow_up_question_about_the_same_data_url_video_is_not_decoded_again(server, model, media_dir):
    """data: videos are kept by a hash of their bytes: turn two (the video sent again, with the
    earlier turns) is a cache hit, counted on /metrics, with the same answer; other frames
    sampled from the same bytes, or other bytes, are decoded."""
    url = data_url(write_video(media_dir / "data-cache.mp4", moving_shapes_video(
        num_frames=24, height=72, width=100, seed=23)).read_bytes())
    before = cache_lookups(server)
    status, turn_one = post(server, video_request(model, url))
    assert status == 200, turn_one
    after_one = cache_lookups(server)
    assert after_one.get(("data", "miss"), 0) == before.get(("data", "miss"), 0) + 1
    conversation = [turn(url, QUESTION), {"role": "assistant", "content": turn_one["choices"][0]["message"]["content"]},
                    turn(url, "And then?")]
    status, turn_two = post(server, chat(model, conversation))
    assert status == 200, turn_two
    after_two = cache_lookups(server)
    assert after_two.get(("data", "hit"), 0) == after_one.get(("data", "hit"), 0) + 1
    assert after_two.get(("data", "miss"), 0) == after_one.get(("data", "miss"), 0)
    status, again = post(server, video_request(model, url))  # the same question: the same answer from the cache
    assert status == 200 and again["choices"][0]["message"] == turn_one["choices"][0]["message"]
    status, more = post(server, video_request(model, url, mm_processor_kwargs={"frames": 16}))  # other sampling
    assert status == 200 and more["usage"]["prompt_tokens"] == turn_one["usage"]["prompt_tokens"] + 8 * 17, more
    assert cache_lookups(server).get(("data", "miss"), 0) == after_two.get(("data", "miss"), 0) + 1


def test_a_changed_http_video_is_not_served_stale(server, model, media_dir, http_media):
    """http(s) videos are downloaded every turn and kept by a hash of their bytes: the same bytes
    skip decoding, new bytes under the same URL (same size, same Last-Modified) are decoded."""
    first, other = two_videos_of_one_size(media_dir, "http-cache", (24, 25))
    path = media_dir / "http-cached.mp4"
    path.write_bytes(first)
    mtime = path.stat().st_mtime_ns
    url = f"{http_media}/{path.name}"
    before = cache_lookups(server)
    status, turn_one = post(server, video_request(model, url))
    assert status == 200, turn_one
    status, turn_two = post(server, video_request(model, url))
    assert status == 200 and turn_two["choices"][0]["message"] == turn_one["choices"][0]["message"]
    counted = cache_lookups(server)
    assert counted.get(("http", "hit"), 0) == before.get(("http", "hit"), 0) + 1
    path.write_bytes(other)
    os.utime(path, ns=(mtime, mtime))  # what a validator would have said: unchanged
    (media_dir / "http-other.mp4").write_bytes(other)
    status, changed = post(server, video_request(model, url))
    assert status == 200, changed
    assert cache_lookups(server).get(("http", "miss"), 0) == counted.get(("http", "miss"), 0) + 1
    status, expected = post(server, video_request(model, f"file://{media_dir / 'http-other.mp4'}"))
    assert changed["choices"][0]["message"] == expected["choices"][0]["message"] != turn_one["choices"][0]["message"]


def test_two_different_videos_are_a_400_saying_how_to_ask_about_two(server, model, clip, long_clip):
    two = [turn(f"file://{clip}", "What moves?"), {"role": "assistant", "content": "A square."},
           turn(f"file://{long_clip}", "And here?")]
    status, reply = post(server, chat(model, two))
    assert status == 400 and reply["error"]["message"].startswith(
        f"this conversation attaches two different videos (video_url 'file://{clip}' in message 1, video_url "
        f"'file://{long_clip}' in message 3): this model takes one video a prompt"), reply
    assert "ask about each in its own request" in reply["error"]["message"]
    assert_served(server, model, clip)


@pytest.mark.parametrize("text", ["hello world " * 3000, "a " * 4000], ids=["over-char-bound", "over-token-bound"])
def test_prompt_and_video_longer_than_max_model_len_is_a_400(server, model, clip, text):
    """vLLM checks characters before tokenizing, then tokens with the video's placeholders."""
    status, reply = post(server, video_request(model, f"file://{clip}", text=text))
    assert status == 400 and "maximum context length" in reply["error"]["message"], reply
    assert_served(server, model, clip)


def test_frame_counts_beyond_the_decoder_limit_are_refused_at_startup():
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    args = parser.parse_args(["--max-video-frames", "16", "--allowed-media-networks", "10.1.0.0/16,fd00::/8"])
    limits = ServeLimits.from_args(args, {"frames": 16})
    assert limits.video.max_frames == 16 and limits.media_hosts.allowed_networks == ("10.1.0.0/16", "fd00::/8")
    assert ServeLimits.from_args(parser.parse_args(["--allow-private-media-hosts"]), {}).media_hosts.allow_private
    with pytest.raises(ValueError, match="--frames/--max-frames 32 exceeds --max-video-frames 16"):
        ServeLimits.from_args(args, {"frames": 8, "max_frames": 32})


def test_max_frames_is_the_one_knob_of_the_decoder_cap_and_the_deadline():
    """--max-frames 128 alone starts: the decoder's cap follows it; the fetch-and-decode deadline
    grows with the frames a request asks for."""
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    assert ServeLimits.from_args(parser.parse_args([]), {"max_frames": 1024}).video.max_frames == 1024
    assert ServeLimits.from_args(parser.parse_args([]), {"frames": 8}).video.max_frames == 64
    limits = ServeLimits.from_args(parser.parse_args(["--video-fetch-timeout", "30"]), {"max_frames": 1024})
    assert [limits.fetch_deadline_s(n) for n in (8, 64, 128, 1024)] == [30, 30, 60, 480]


def test_silent_http_host_is_given_up_on_at_the_fetch_timeout(server, model, silent_url):
    """vLLM alone retries a dead host 3 times with growing timeouts: 30 + 120 + 480 s."""
    start = time.monotonic()
    status, reply = post(server, video_request(model, silent_url))
    assert status == 422 and time.monotonic() - start < FETCH_TIMEOUT_S + 3
    expected = f"video_url '{silent_url}'(: not fetched| was not fetched and decoded) within {FETCH_TIMEOUT_S} s"
    assert re.search(expected, reply["error"]["message"]), reply


@pytest.fixture(scope="module")
def http_media(media_dir):
    """An http server on LOCAL_HOST serving the media directory; /redirect/<url> redirects to <url>."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", self.path[len("/redirect/"):])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

    httpd = ThreadingHTTPServer((LOCAL_HOST, 0), partial(QuietHandler, directory=str(media_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://{LOCAL_HOST}:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def long_clip(media_dir) -> Path:
    return write_video(media_dir / "long-clip.mp4", moving_shapes_video(num_frames=120, height=72, width=100, seed=9),
                       gop=30, b_frames=2)


def test_request_frames_decide_how_a_url_video_is_decoded(server, model, long_clip, http_media):
    """mm_processor_kwargs.frames reaches the decoder: file://, data: and http give that many frames
    (the prompt grows by 17 tokens a frame) and the same answer; above --max-frames it is a 400."""
    urls = {"file": f"file://{long_clip}", "data": data_url(long_clip.read_bytes()),
            "http": f"{http_media}/{long_clip.name}"}
    replies = {}
    for scheme, url in urls.items():
        for frames in (8, 16):
            status, reply = post(server, video_request(model, url, mm_processor_kwargs={"frames": frames}))
            assert status == 200, (scheme, frames, reply)
            replies[scheme, frames] = reply
    default = assert_served(server, model, long_clip)
    for scheme in urls:
        assert replies[scheme, 8]["usage"]["prompt_tokens"] == default["usage"]["prompt_tokens"]
        assert replies[scheme, 16]["usage"]["prompt_tokens"] == default["usage"]["prompt_tokens"] + 8 * 17
        assert replies[scheme, 16]["choices"][0]["message"] == replies["file", 16]["choices"][0]["message"]
    status, reply = post(server, video_request(model, urls["http"], mm_processor_kwargs={"frames": MAX_FRAMES + 1}))
    assert status == 400 and "mm_processor_kwargs.frames=17: expected an integer from 1 to 16" in \
        reply["error"]["message"], reply


@pytest.mark.parametrize("url, status, message", [
    ("http://127.0.0.1:{port}/clip.mp4", 400, r"refused: 127.0.0.1, a loopback address"),
    ("http://localhost:{port}/clip.mp4", 400, r"host 'localhost' resolves only to refused addresses"),
    ("http://[::1]:{port}/clip.mp4", 400, r"refused: ::1, a loopback address"),
    ("http://10.0.0.7/clip.mp4", 400, r"refused: 10.0.0.7, a private address"),
    ("http://169.254.169.254/latest/meta-data/", 400, r"refused: 169.254.169.254, a link-local address"),
    ("{base}/redirect/http://127.0.0.1:{port}/clip.mp4", 400,
     r"redirected to 'http://127.0.0.1:\d+/clip.mp4': refused: 127.0.0.1, a loopback address"),
    ("{base}/redirect/{base}/redirect/{base}/redirect/{base}/redirect/{base}/redirect/{base}/redirect/{base}/clip.mp4",
     422, "more than 5 redirects"),
    ("{base}/missing.mp4", 422, r"HTTP 404"),
    ("{base}/big.mp4", 400, f"too large: {MAX_VIDEO_BYTES + 1} bytes; at most {MAX_VIDEO_BYTES} bytes"),
], ids=["loopback", "name-to-loopback", "ipv6-loopback", "private", "metadata", "redirect-to-loopback",
        "redirect-chain", "http-404", "http-too-big"])
def test_video_urls_cannot_reach_this_hosts_network(server, model, media_dir, clip, http_media, url, status, message):
    """Only public hosts and --allowed-media-networks are fetched, each redirect hop checked;
    the error is a 4xx naming video_url, the host and the reason."""
    (media_dir / "big.mp4").write_bytes(bytes(MAX_VIDEO_BYTES + 1))
    port = http_media.rsplit(":", 1)[1]
    got, reply = post(server, video_request(model, url.format(base=http_media, port=port)))
    assert got == status, reply
    assert reply["error"]["message"].startswith("video_url "), reply
    assert re.search(message, reply["error"]["message"]), reply["error"]["message"]
    status, reply = post(server, video_request(model, f"{http_media}/{clip.name}"))  # the allowed network works
    assert status == 200, reply


def test_chunked_body_over_the_limit_is_a_413_before_it_is_buffered(server):
    """300 MB sent chunked (no Content-Length): refused once the limit is crossed; the server grows < 64 MB."""
    import psutil

    port = int(server.rsplit(":", 1)[1])
    [pid] = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    api_server = psutil.Process(pid)
    before = api_server.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, api_server.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent = 0

    def body():
        nonlocal sent
        chunk = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * (1 << 20)
        yield chunk
        sent += len(chunk)
        for _ in range(300):
            yield b"a" * (1 << 20)
            sent += 1 << 20

    try:
        response = requests.post(f"{server}/v1/chat/completions", data=body(),
                                 headers={"Content-Type": "application/json"}, timeout=120)
        status, text = response.status_code, response.text
    finally:
        done.set()
        sampler.join()
    assert status == 413 and "chunked request body of more than" in text, text
    assert sent < 300 << 20
    assert peak - before < 64 << 20


def test_one_frame_video_is_padded_to_the_encoder_window(server, model, media_dir, clip):
    """One frame is a video: it is repeated up to the 8-frame window, like any short clip."""
    one = write_video(media_dir / "one.mp4", moving_shapes_video(num_frames=1, height=72, width=100))
    status, reply = post(server, video_request(model, f"file://{one}"))
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == assert_served(server, model, clip)["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def live_webm(media_dir) -> tuple[Path, Path]:
    """A VP9 WebM as browsers' MediaRecorder writes it (no duration, no cues), and the same
    frames in an ordinary WebM."""
    frames = moving_shapes_video(num_frames=40, height=72, width=100, seed=11)
    return (write_video(media_dir / "live.webm", frames, fps=30, container_options={"live": "1"}),
            write_video(media_dir / "indexed.webm", frames, fps=30))


def test_live_stream_webm_is_served_like_the_indexed_one(server, model, live_webm):
    live, indexed = live_webm
    expected = assert_served(server, model, indexed)
    for url in (f"file://{live}", "data:video/webm;base64," + base64.b64encode(live.read_bytes()).decode()):
        status, reply = post(server, video_request(model, url))
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert reply["usage"] == expected["usage"]


@pytest.mark.parametrize("kind", ["h264-720p-bframes", "hevc-10bit", "av1", "rotated"])
def test_real_world_encodings_are_served(server, model, media_dir, clip, kind):
    frames = moving_shapes_video(num_frames=60, height=720 if kind == "h264-720p-bframes" else 90, width=1280
                                 if kind == "h264-720p-bframes" else 160, seed=5)
    writers = {"h264-720p-bframes": dict(codec="libx264", gop=50, b_frames=3, options={"preset": "veryfast"}),
               "hevc-10bit": dict(codec="libx265", pix_fmt="yuv420p10le", options={"x265-params": "log-level=error"}),
               "av1": dict(codec="libsvtav1"), "rotated": dict(rotation=90)}
    path = write_video(media_dir / f"{kind}.mkv", frames, fps=30, **writers[kind])
    status, reply = post(server, video_request(model, f"file://{path}"))
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == assert_served(server, model, clip)["usage"]["prompt_tokens"]


def test_mp4_that_crashes_opencv_stream_reader_is_served(server, model, media_dir, clip):
    data = malformed_dref_mp4(clip.read_bytes())
    status, reply = post(server, video_request(model, data_url(data)))
    assert status == 200, reply
    assert_served(server, model, clip)


def test_ffconcat_script_cannot_make_the_server_decode_a_file_beside_its_temp_file(server, model, clip):
    """FFmpeg would take these bytes as a concat script and decode the named video from the
    server's temp directory (shown first without the demuxer whitelist)."""
    secret = Path(tempfile.gettempdir()) / f"intp-vllm-secret-{os.getpid()}.mp4"
    script = Path(tempfile.gettempdir()) / f"intp-vllm-script-{os.getpid()}.video"
    secret.write_bytes(clip.read_bytes())
    script.write_text(f"ffconcat version 1.0\nfile {secret.name}\nduration 3\n")
    try:
        env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_CAPTURE_OPTIONS"}
        code = "import cv2, sys; print(cv2.VideoCapture(sys.argv[1], cv2.CAP_FFMPEG).read()[0])"
        unrestricted = subprocess.run([sys.executable, "-c", code, str(script)], env=env, capture_output=True,
                                      text=True)
        status, reply = post(server, video_request(model, data_url(script.read_bytes())))
    finally:
        secret.unlink()
        script.unlink()
    assert unrestricted.stdout.strip() == "True"
    assert status == 400 and "not a video PyAV can open" in reply["error"]["message"]


def test_opencv_stream_reader_does_crash_on_that_mp4(tmp_path, clip):
    """Negative control: the reader vLLM's own loader uses dies on it (so we decode from a file)."""
    path = tmp_path / "dref.mp4"
    path.write_bytes(malformed_dref_mp4(clip.read_bytes()))
    code = ("import cv2, io, sys; stream = io.BytesIO(open(sys.argv[1], 'rb').read()); "
            "cv2.VideoCapture(stream, cv2.CAP_FFMPEG, []).read()")
    assert subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True).returncode < 0


# ------------------------------------------------------------------------------ load


def test_small_load_has_no_failures(server, model, clip):
    result = asyncio.run(run_load(server, chat_request(model, f"file://{clip}"), clients=MAX_IN_FLIGHT,
                                  requests_per_client=5, max_seconds=120))
    assert result.failed == 0, result.summary()


def test_burst_over_the_in_flight_limit_gets_503s_then_the_server_recovers(server, model, clip, silent_url):
    """Slow requests (a silent video host) fill every slot; a burst then gets 503 at once."""

    async def hold_and_burst():
        holders = asyncio.ensure_future(run_load(server, chat_request(model, silent_url), MAX_IN_FLIGHT, 1))
        await asyncio.sleep(1.0)
        burst = await run_load(server, chat_request(model, f"file://{clip}"), 3 * MAX_IN_FLIGHT, 1)
        return await holders, burst

    holders, burst = asyncio.run(hold_and_burst())
    assert holders.statuses == {422: MAX_IN_FLIGHT}, holders.summary()
    assert burst.statuses == {503: 3 * MAX_IN_FLIGHT}, burst.summary()
    assert f"server busy: {MAX_IN_FLIGHT} requests in flight, the limit is {MAX_IN_FLIGHT}" in burst.errors[0]
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
    assert_served(server, model, clip)


# ------------------------------------------------------------------------------ bounded decoding


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """3000 frames of 160x120: 173 MB if decoded whole."""
    frames = moving_shapes_video(num_frames=3000, height=120, width=160, seed=3)
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames, fps=30)


PEAK_RSS_SCRIPT = """
import sys
import cv2
from intp_vllm.video.preprocess import ClipPreprocessConfig
from intp_vllm.video.io import VideoLimits, sample_video

def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would include the parent's at fork)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

path, max_frames, max_pixels, whole = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "whole"
crop = int(sys.argv[5])  # 0: full frames
preprocess = ClipPreprocessConfig(shortest_edge=crop, crop_size=crop) if crop else None
data = open(path, "rb").read()
limits = VideoLimits(max_frames=max_frames, max_frame_pixels=max_pixels)
sample_video(data, 1, limits, preprocess=preprocess)  # load the codec before measuring
before = peak_rss()
if whole:  # negative control: every frame in memory
    capture, kept = cv2.VideoCapture(path), []
    while (frame := capture.read()[1]) is not None:
        kept.append(frame)
else:
    kept = sample_video(data, max_frames, limits, preprocess=preprocess)  # as the server's loader decodes
print(peak_rss() - before)
"""


def peak_rss_growth(path: Path, limits: VideoLimits, whole: bool = False, crop: int = 0) -> int:
    """Bytes the peak RSS of a fresh process grows by while decoding `path` (Linux), each frame
    cropped to `crop` px as it is decoded (0: full frames)."""
    args = [sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), str(limits.max_frames), str(limits.max_frame_pixels),
            "whole" if whole else "sampled", str(crop)]
    return int(subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()[-1])


def test_long_video_decoding_holds_only_the_sampled_frames(long_video):
    limits = VideoLimits(max_frames=64, max_frame_pixels=160 * 120)
    decoder_overhead = 16 << 20
    growth = peak_rss_growth(long_video, limits)
    assert growth < limits.decoded_bytes_bound + decoder_overhead, growth
    whole = peak_rss_growth(long_video, limits, whole=True)  # the measurement does see a whole decode
    assert whole > 100 << 20 and whole > 4 * (limits.decoded_bytes_bound + decoder_overhead), whole


def test_1024_frames_decoded_with_preprocessing_hold_only_the_crops(long_video):
    """A large frame count as the server decodes it: 1024 of 3000 frames, each cropped as it is
    decoded, cost the crops and a constant (a 56-px crop: 9.6 MB), not 1024 frames; the same at a
    224-px crop (154 MB of crops) shows the measurement sees every kept crop."""
    limits = VideoLimits(max_frames=1024, max_frame_pixels=160 * 120)
    frame, decoder = 160 * 120 * 3, 48 << 20
    small = peak_rss_growth(long_video, limits, crop=56)
    assert small < 1024 * 56 * 56 * 3 + 4 * frame + decoder, small
    large = peak_rss_growth(long_video, limits, crop=224)
    assert large > 1024 * 224 * 224 * 3 > small + (64 << 20), (large, small)


def test_hd_video_decoded_with_preprocessing_holds_only_the_crops(tmp_path):
    """64 frames of 1080p H.264 as the server decodes them: 64 crops of 224x224 and one frame
    in flight, not 64 full frames (380 MiB)."""
    frames = np.repeat(moving_shapes_video(num_frames=8, height=1080, width=1920, seed=2), 10, axis=0)
    path = write_video(tmp_path / "hd.mp4", frames, fps=30, gop=30, b_frames=2, options={"preset": "ultrafast"})
    limits = VideoLimits(max_frames=64)
    crops, frame, decoder = 64 * 224 * 224 * 3, 1920 * 1080 * 3, 48 << 20
    growth = peak_rss_growth(path, limits, crop=224)
    assert growth < crops + 4 * frame + decoder < limits.decoded_bytes_bound / 3, growth


def test_server_loader_gives_vllm_loader_frames(long_video):
    """Swapping vLLM's OpenCV loader for ours changes no pixel and no index, only the cost."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    data = long_video.read_bytes()
    theirs, their_meta = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(data, num_frames=8)
    ours, our_meta = IntpVideoLoader.load_bytes(data, num_frames=8)
    np.testing.assert_array_equal(ours, theirs)
    assert our_meta["frames_indices"] == their_meta["frames_indices"]
    assert our_meta["total_num_frames"] == their_meta["total_num_frames"] == 3000
    np.testing.assert_array_equal(read_video(long_video, 8), ours)
