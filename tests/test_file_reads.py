"""Reading `file://` videos for clients (video/fetch.py): only regular files, and a read that
never returns holds one bounded slot. Real FIFOs, sockets, devices and directories; no engine.
(The same against the live server: test_robustness.py.)"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from intp_vllm.video.fetch import FileReadSlots, FileReadsStuck, file_kind, file_url_path, read_local_file


@pytest.mark.parametrize("url, path", [
    ("file:///srv/media/clip.mp4", "/srv/media/clip.mp4"),
    ("file://localhost/srv/media/clip.mp4", "/srv/media/clip.mp4"),
    ("file://LOCALHOST/srv/media/clip.mp4", "/srv/media/clip.mp4"),
    ("file:/srv/media/clip.mp4", "/srv/media/clip.mp4"),
    ("file:///srv/media/a%20clip%23.mp4", "/srv/media/a clip#.mp4"),
])
def test_file_url_forms_of_rfc_8089_name_the_same_path(url, path):
    assert file_url_path(url) == Path(path)


@pytest.mark.parametrize("url, message", [
    ("file://fileserver/srv/clip.mp4", "names host 'fileserver': file URLs name a path on this server"),
    ("file:clip.mp4", "expected an absolute path"),
    ("http://host/clip.mp4", "expected a file:// URL"),
])
def test_file_urls_for_other_hosts_or_relative_paths_are_refused(url, message):
    with pytest.raises(ValueError, match=message):
        file_url_path(url)


@pytest.fixture
def media(tmp_path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"video bytes")
    return media.resolve()


def test_a_regular_file_is_read_whole(media):
    (media / "sub").mkdir()
    assert read_local_file(media / "clip.mp4", media, 100)[0] == b"video bytes"
    assert read_local_file(media / "sub" / ".." / "clip.mp4", media, 100)[0] == b"video bytes"


def test_a_fifo_is_refused_from_its_stat_without_being_opened(media):
    """Opening a FIFO without a writer blocks forever (the field report's hang): refused at once."""
    os.mkfifo(media / "pipe.mp4")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^is a FIFO \(named pipe\), not a regular file; only video files are read$"):
        read_local_file(media / "pipe.mp4", media, 100)
    assert time.monotonic() - start < 1


def test_sockets_directories_and_devices_are_refused_naming_their_kind(media, tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(media / "sock.mp4"))
    (media / "dir.mp4").mkdir()
    try:
        with pytest.raises(ValueError, match=r"^is a socket, not a regular file"):
            read_local_file(media / "sock.mp4", media, 100)
        with pytest.raises(ValueError, match=r"^is a directory, not a regular file"):
            read_local_file(media / "dir.mp4", media, 100)
        with pytest.raises(ValueError, match=r"^is a character device, not a regular file"):
            read_local_file(Path("/dev/zero"), Path("/dev"), 100)  # would never end
    finally:
        listener.close()
    assert file_kind(os.stat(media / "clip.mp4").st_mode) == "a regular file"


def test_paths_outside_the_allowed_directory_are_refused_after_resolving(media, tmp_path):
    (tmp_path / "outside.mp4").write_bytes(b"secret")
    (media / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    for path in (tmp_path / "outside.mp4", media / ".." / "outside.mp4", media / "link.mp4", media):
        with pytest.raises(ValueError, match="must be a subpath of `--allowed-local-media-path`"):
            read_local_file(path, media, 100)
    (media / "inside.mp4").symlink_to(media / "clip.mp4")  # a link that stays inside is followed
    assert read_local_file(media / "inside.mp4", media, 100)[0] == b"video bytes"


def test_size_is_checked_before_reading_and_a_missing_file_is_an_os_error(media):
    with pytest.raises(ValueError, match=r"^is a file of 11 bytes; at most 10 bytes of video are allowed$"):
        read_local_file(media / "clip.mp4", media, 10)
    with pytest.raises(FileNotFoundError):
        read_local_file(media / "missing.mp4", media, 100)


def blocking_read(path: Path) -> bytes:
    """A read that blocks until someone writes to the FIFO at `path` (a stalled mount's stand-in)."""
    with open(path, "rb") as pipe:
        return pipe.read()


def test_reads_that_never_return_hold_one_slot_each_then_further_reads_are_refused_at_once(tmp_path):
    slots = FileReadSlots(2)
    pipes = [tmp_path / f"pipe{i}" for i in range(2)]
    for pipe in pipes:
        os.mkfifo(pipe)
    (tmp_path / "clip.mp4").write_bytes(b"video bytes")

    async def scenario():
        for pipe in pipes:  # each caller gives up at its deadline; its read stays blocked
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slots.run(blocking_read, pipe), 0.2)
        assert slots.stuck == 2 and not slots.healthy
        assert slots.status() == "2 of 2 file-read slots stuck, 2 in use"
        start = time.monotonic()
        with pytest.raises(FileReadsStuck, match="every one of this server's 2 file-read slots holds a read"):
            await slots.run(Path.read_bytes, tmp_path / "clip.mp4")
        refused_in = time.monotonic() - start
        for pipe in pipes:  # the stalled reads return (a writer opens and closes each FIFO)
            os.close(os.open(pipe, os.O_WRONLY))
        for _ in range(100):
            if slots.healthy and slots.stuck == 0:
                break
            await asyncio.sleep(0.02)
        return refused_in, slots.stuck, await slots.run(Path.read_bytes, tmp_path / "clip.mp4")

    refused_in, stuck, data = asyncio.run(scenario())
    assert refused_in < 0.1 and stuck == 0 and data == b"video bytes"
    assert slots.status() == "0 of 2 file-read slots stuck, 0 in use"


def test_a_busy_slot_is_waited_for_and_errors_reach_the_caller(tmp_path):
    """One slot: a second read waits for the first (not stuck, just slow) instead of failing."""
    slots = FileReadSlots(1)
    os.mkfifo(tmp_path / "pipe")

    async def scenario():
        first = asyncio.ensure_future(slots.run(blocking_read, tmp_path / "pipe"))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(slots.run(read_local_file, tmp_path / "missing", tmp_path, 10))
        await asyncio.sleep(0.2)
        assert not second.done() and slots.stuck == 0
        with open(tmp_path / "pipe", "wb") as pipe:
            pipe.write(b"frames")
        assert await first == b"frames"
        with pytest.raises(FileNotFoundError):
            await second

    asyncio.run(scenario())


@pytest.mark.parametrize("slots", [0, -1, True, 1.5])
def test_slot_count_must_be_a_positive_integer(slots):
    with pytest.raises(ValueError, match="file read slots must be a positive integer"):
        FileReadSlots(slots)


def test_health_is_a_503_naming_the_stuck_reads_while_every_slot_is_stuck(tmp_path, monkeypatch):
    """`intp-vllm serve`'s /health (RequestLimitMiddleware) while reads are stuck: a load balancer
    routes video elsewhere; once they return, the request goes on to vLLM's /health."""
    import json

    from intp_vllm.apps import serve
    from intp_vllm.vllm_ext import media

    slots = FileReadSlots(1)
    monkeypatch.setattr(media, "_file_reads", slots)
    os.mkfifo(tmp_path / "pipe")
    reached_vllm = []

    async def vllm_health(scope, receive, send):
        reached_vllm.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def get_health():
        sent = []

        async def send(message):
            sent.append(message)

        await serve.RequestLimitMiddleware(vllm_health)({"type": "http", "method": "GET", "path": "/health"},
                                                        None, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]

    async def scenario():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slots.run(blocking_read, tmp_path / "pipe"), 0.1)
        stuck = await get_health()
        os.close(os.open(tmp_path / "pipe", os.O_WRONLY))
        while slots.stuck:
            await asyncio.sleep(0.02)
        return stuck, await get_health()

    (status, headers, body), (after, after_headers, _) = asyncio.run(scenario())
    assert status == 503 and headers[b"x-intp-stuck-file-reads"] == b"1/1"
    assert json.loads(body)["error"]["message"].startswith(
        "video path unhealthy: 1 of 1 file-read slots stuck, 1 in use: reads of file:// videos have not returned")
    assert after == 200 and after_headers[b"x-intp-stuck-file-reads"] == b"0/1" and reached_vllm == ["/health"]


@pytest.mark.parametrize("raised", [
    "video_url 'file:///tmp/media/pipe.mp4': is a FIFO (named pipe), not a regular file; only video files are read",
    "video_url 'file:///srv/videos/a/b.mp4' could not be fetched: FileNotFoundError: No such file or directory "
    "(parameter=video_url)",
])
def test_error_messages_sanitised_by_vllm_get_the_client_s_url_back(raised):
    import json

    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message

    from intp_vllm.apps.serve import _with_raised_message

    sanitised = sanitize_message(raised)
    assert "<path>" in sanitised  # what vLLM alone answers
    body = json.dumps({"error": {"message": sanitised, "type": "BadRequestError", "param": None, "code": 400}})
    assert json.loads(_with_raised_message(body.encode(), ["another message", raised]))["error"]["message"] == raised
    other = json.dumps({"error": {"message": sanitize_message("video_url 'file:///tmp/x/other.mp4': is a FIFO"),
                                  "type": "BadRequestError", "param": None, "code": 400}}).encode()
    assert _with_raised_message(other, [raised]) == other  # only this request's own messages come back



def test_the_decoded_video_cache_keeps_the_most_recent_videos_within_its_bytes():
    import numpy as np
    from vllm.multimodal.media.base import MediaWithBytes

    from intp_vllm.vllm_ext.media import DecodedVideoCache

    def video(fill: int) -> MediaWithBytes:  # 600 bytes of frames + 400 of file
        return MediaWithBytes((np.full((2, 10, 10, 3), fill, np.uint8), {"fill": fill}), bytes(400))

    cache = DecodedVideoCache(2500)
    cache.put("a", video(1))
    cache.put("b", video(2))
    assert cache.get("a") is not None  # now the most recent
    cache.put("c", video(3))  # over 2500 bytes: "b", the least recent, goes
    assert cache.get("b") is None and len(cache) == 2 and cache.held_bytes == 2000
    hit = cache.get("a")
    hit.media[0][:] = 9  # a request changing its frames does not change the cache's
    assert cache.get("a").media[0].max() == 1 and cache.get("a").original_bytes == bytes(400)
    cache.put("big", MediaWithBytes((np.zeros((3000,), np.uint8), {}), b""))  # larger than the cache: not kept
    assert cache.get("big") is None and len(cache) == 2
    served = video(4)
    cache.put("d", served)
    served.media[0][:] = 7  # the request that decoded it changes its frames: the cache keeps its own
    assert cache.get("d").media[0].max() == 4
    assert cache.lookups == {("file", "hit"): 5, ("file", "miss"): 2}


def test_data_and_http_videos_are_kept_by_a_hash_of_their_bytes_and_the_sampling(tmp_path):
    """`ContentCachedVideoIO` (vLLM's VideoMediaIO with our loader, as the connector builds it):
    the same bytes with the same sampling are decoded once; other bytes or other frames miss."""
    import base64

    import numpy as np
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video
    from intp_vllm.vllm_ext.internals import ImageMediaIO, VideoMediaIO
    from intp_vllm.vllm_ext.media import MEDIA_HOOK_NAME, ContentCachedVideoIO, DecodedVideoCache
    from intp_vllm.vllm_ext.plugin import register

    register()  # our loader, as in every vLLM process
    one, two = (write_video(tmp_path / f"v{seed}.mp4", moving_shapes_video(num_frames=16, height=48, width=64,
                                                                          seed=seed)).read_bytes() for seed in (1, 2))
    cache = DecodedVideoCache(64 << 20)

    def io(frames: int, source: str) -> ContentCachedVideoIO:
        video = {"num_frames": frames, "video_backend": MEDIA_HOOK_NAME, "frame_size": 32}
        return ContentCachedVideoIO(VideoMediaIO(ImageMediaIO(image_mode="RGB"), **video), cache,
                                    ({"image_mode": "RGB"}, video), source)

    first = io(8, "data").load_base64("video/mp4", base64.b64encode(one).decode())
    again = io(8, "http").load_bytes(one)  # the same bytes from an http URL: one video
    assert cache.lookups == {("data", "miss"): 1, ("http", "hit"): 1}
    assert np.array_equal(again.media[0], first.media[0]) and again.original_bytes == one
    assert again.media[1]["frames_indices"] == first.media[1]["frames_indices"]
    other = io(8, "http").load_bytes(two)
    more = io(4, "data").load_bytes(one)
    assert cache.lookups == {("data", "miss"): 2, ("http", "hit"): 1, ("http", "miss"): 1}
    assert not np.array_equal(other.media[0], first.media[0]) and len(more.media[0]) == 4 and len(cache) == 3
