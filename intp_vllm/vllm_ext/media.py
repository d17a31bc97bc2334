"""How `video_url` parts reach the model under a server's limits: vLLM's media connector and
video loader, ours (registered by the plugin in every vLLM process).

`IntpVideoLoader` decodes (video/io.py) and preprocesses each frame as it is decoded;
`BoundedMediaConnector` checks files, data URLs and fetches (video/fetch.py) before they cost
memory, reads files in bounded slots (`fetch.FileReadSlots`) and keeps decoded videos for a
chat's next turn (`DecodedVideoCache`); both follow the `ServeLimits` that `intp-vllm serve`
installs through one environment variable, so the API-server processes it starts see them
too (docs/robustness.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
from collections import Counter
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from intp_vllm.video.fetch import (FetchError, FileReadSlots, FileReadsStuck, HostPolicy, fetch_bytes,
                                   file_url_path, local_file_stat, read_local_file, short_url)
from intp_vllm.video.io import DECODERS, VideoLimits, sample_video
from intp_vllm.video.preprocess import ClipPreprocessConfig, resize_and_crop
from intp_vllm.vllm_ext.client_messages import for_the_client
from intp_vllm.vllm_ext.image_frames import frame_list_urls
from intp_vllm.core.checks import PILLOW, check_positive_int, check_preprocess_device

LIMITS_ENV = "INTP_VLLM_SERVE_LIMITS"
MEDIA_HOOK_NAME = "intp_vllm"
"""Name of our media connector (VLLM_MEDIA_CONNECTOR) and video loader (video_backend)."""
REQUEST_TEXT_BYTES = 1 << 20
"""Room for the JSON and text of a request on top of a base64 video."""
VIDEO_TIMESTAMPS: ContextVar[list | None] = ContextVar("intp_vllm_video_timestamps", default=None)
"""A request's list of its decoded videos' frame times (a list of seconds each), where the server's
middleware set one (apps/serve.py, which returns them in a response header); the media connector
appends to it."""
FETCH_TIMEOUT_FRAMES = 64
"""--video-fetch-timeout is the deadline of a video of up to this many frames; more get it pro rata."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the server: its video (see VideoLimits), its fetch time,
    and how many requests may be in flight at once; which hosts its video may come from
    (see fetch.HostPolicy); which decoder reads its video; whether a video may come as
    its frames, image_url parts (image_frames.py); how many file reads may be stuck at
    once (fetch.FileReadSlots); and how many bytes of decoded videos are kept for
    a chat's next turn (DecodedVideoCache; 0: none)."""

    video: VideoLimits = field(default_factory=VideoLimits)
    fetch_timeout_s: float = 30.0
    max_in_flight: int = 64
    video_decoder: str = "pyav"
    media_hosts: HostPolicy = field(default_factory=HostPolicy)
    image_frames: bool = True
    file_read_slots: int = 8
    video_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.video_decoder not in DECODERS:
            raise ValueError(f"video decoder {self.video_decoder!r} is not one of {sorted(DECODERS)}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"video fetch timeout must be > 0 seconds, got {self.fetch_timeout_s!r}")
        check_positive_int("max in-flight requests", self.max_in_flight)
        check_positive_int("file read slots", self.file_read_slots)
        if isinstance(self.video_cache_bytes, bool) or not isinstance(self.video_cache_bytes, int) \
                or self.video_cache_bytes < 0:
            raise ValueError(f"video cache bytes must be an integer >= 0, got {self.video_cache_bytes!r}")

    @property
    def max_request_bytes(self) -> int:
        """A request body: the largest video as base64, plus text."""
        return 4 * math.ceil(self.video.max_bytes / 3) + REQUEST_TEXT_BYTES

    def fetch_deadline_s(self, frames: int) -> float:
        """Seconds to fetch and decode one video of `frames` frames: `fetch_timeout_s` for up to
        FETCH_TIMEOUT_FRAMES frames, pro rata above."""
        return self.fetch_timeout_s * max(1.0, frames / FETCH_TIMEOUT_FRAMES)

    @classmethod
    def from_args(cls, args: argparse.Namespace, intp: dict) -> "ServeLimits":
        """From add_limit_arguments' flags; the INTP frame counts must fit the decoder's, whose cap
        follows --max-frames (at least VideoLimits' default) unless --max-video-frames is given."""
        frames = max(intp.get("frames", 0), intp.get("max_frames") or 0)
        video = VideoLimits(max_frames=args.max_video_frames or max(VideoLimits.max_frames, frames),
                            max_frame_pixels=args.max_frame_pixels, max_bytes=args.max_video_bytes)
        if frames > video.max_frames:
            raise ValueError(f"--frames/--max-frames {frames} exceeds --max-video-frames {video.max_frames}: "
                             "no video could be decoded at that many frames; raise --max-video-frames")
        return cls(video, fetch_timeout_s=args.video_fetch_timeout, max_in_flight=args.max_in_flight_requests,
                   video_decoder=args.video_decoder, media_hosts=HostPolicy.from_args(args),
                   image_frames=args.image_frames, file_read_slots=args.file_read_slots,
                   video_cache_bytes=args.video_cache_bytes)

    @classmethod
    def from_env(cls) -> "ServeLimits":
        """The limits `run_server` installed (defaults outside `intp-vllm serve`)."""
        text = os.environ.get(LIMITS_ENV)
        if not text:
            return cls()
        values = json.loads(text)
        hosts = values.pop("media_hosts")
        return cls(video=VideoLimits(**values.pop("video")),
                   media_hosts=HostPolicy(**{**hosts, "allowed_networks": tuple(hosts["allowed_networks"])}), **values)


def media_limits_env(limits: ServeLimits) -> dict[str, str]:
    """The environment that routes video_url parts through our connector and loader under
    `limits` (the plugin registers the connector in every process that reads it); a smaller
    VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB already in this environment stands."""
    download_mb = math.ceil(limits.video.max_bytes / (1 << 20))
    return {LIMITS_ENV: json.dumps(asdict(limits)), "VLLM_MEDIA_CONNECTOR": MEDIA_HOOK_NAME,
            "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(
                min(download_mb, int(os.environ.get("VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB", download_mb))))}


def install_media_limits(limits: ServeLimits) -> None:
    """`media_limits_env` in this process and the API-server processes it starts (they inherit
    the environment)."""
    os.environ.update(media_limits_env(limits))


_file_reads: FileReadSlots | None = None


def file_read_slots() -> FileReadSlots:
    """This process's slots for reading `file://` videos and frames (`ServeLimits.file_read_slots`
    of them), made on first use; `/health` reports them (serve.py)."""
    global _file_reads
    if _file_reads is None:
        _file_reads = FileReadSlots(ServeLimits.from_env().file_read_slots)
    return _file_reads


class DecodedVideoCache:
    """Decoded videos (vLLM's `MediaWithBytes`: frames, metadata and the encoded bytes, which
    vLLM hashes, so a hit gives the same multimodal hash and the prefix cache still applies)
    kept for a chat's next turn, least recently used first out, at most `max_bytes` (frames
    plus encoded bytes; a video larger than that is not kept). A key is the video's identity
    (`_file_key`: a file's device, inode, size and mtime, so a changed file misses;
    `_content_key`: a hash of a data: or http(s) video's bytes) and the decode's settings
    (`media_io_kwargs`: frame count, rate, time range, frame size, decoder). It keeps, and a
    hit hands out, a copy of the frames (a request may change its own). `get` counts hits and
    misses by source (`file`, `data`, `http`) in `lookups` and in the Prometheus counter
    `intp_vllm:decoded_video_cache_lookups_total` that `/metrics` shows. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict
        from threading import Lock

        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.lookups: Counter = Counter()
        """(source, "hit" or "miss") -> lookups in this process."""
        self._entries: OrderedDict = OrderedDict()
        self._lock = Lock()
        self._metric = _lookup_metric()

    def get(self, key, source: str = "file"):
        """A copy of the video kept under `key`, or None; counted as a `source` hit or miss."""
        with self._lock:
            video = self._entries.get(key)
            result = "miss" if video is None else "hit"
            self.lookups[source, result] += 1
            if video is not None:
                self._entries.move_to_end(key)
        if self._metric is not None:
            self._metric.labels(source=source, result=result).inc()
        return None if video is None else _copied(video)

    def put(self, key, video) -> None:
        size = _held_bytes(video)
        if size > self.max_bytes:
            return
        video = _copied(video)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = video
            self.held_bytes += size
            while self.held_bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.held_bytes -= _held_bytes(old)

    def __len__(self) -> int:
        return len(self._entries)


def _copied(video):
    (frames, metadata) = video.media
    return replace(video, media=(np.array(frames, copy=True), dict(metadata)))


def _held_bytes(video) -> int:
    return int(np.asarray(video.media[0]).nbytes) + len(video.original_bytes)


def _file_key(found: os.stat_result, sampling: tuple) -> tuple:
    """A file's version (device, inode, size, mtime: any path to it) and the decode's settings."""
    return ("file", found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, _settings(sampling))


def _content_key(data: bytes, sampling: tuple) -> tuple:
    """Encoded video bytes (their SHA-256) and the decode's settings: the same bytes from any
    data: or http(s) URL are one video."""
    return ("content", hashlib.sha256(data).hexdigest(), _settings(sampling))


def _settings(sampling: tuple) -> str:
    return json.dumps(sampling, sort_keys=True, default=str)


def _lookup_metric():
    """The Prometheus counter of cache lookups (made once a process; None without prometheus_client)."""
    global _LOOKUP_METRIC
    if _LOOKUP_METRIC is None:
        try:
            from prometheus_client import Counter as PrometheusCounter
        except ImportError:
            return None
        _LOOKUP_METRIC = PrometheusCounter("intp_vllm:decoded_video_cache_lookups",
                                           "Decoded-video cache lookups (--video-cache-bytes) by video source "
                                           "(file, data, http) and result (hit: not fetched or not decoded again)",
                                           ["source", "result"])
    return _LOOKUP_METRIC


_LOOKUP_METRIC = None


class ContentCachedVideoIO:
    """vLLM's VideoMediaIO for a data: or http(s) video, decoding through `cache` by the bytes'
    hash and `sampling` (`_content_key`): a chat's next turn sending the same bytes (a data URL
    again, or an http resource whose bytes did not change) skips decoding. The bytes are
    always fetched: vLLM's connector hands them to `load_bytes`/`load_base64` (docs/robustness.md,
    "Multi-turn chats"). Other members are the wrapped IO's."""

    def __init__(self, video_io, cache: DecodedVideoCache, sampling: tuple, source: str) -> None:
        self.video_io, self.cache, self.sampling, self.source = video_io, cache, sampling, source

    def __getattr__(self, name: str):
        return getattr(self.video_io, name)

    def load_bytes(self, data: bytes):
        key = _content_key(data, self.sampling)
        if (hit := self.cache.get(key, self.source)) is not None:
            return hit
        video = self.video_io.load_bytes(data)
        self.cache.put(key, video)
        return video

    def load_base64(self, media_type: str, data: str):
        """A data URL's payload (BoundedMediaConnector has checked that it is a base64 `video/*`),
        decoded as vLLM's VideoMediaIO decodes it."""
        import pybase64

        return self.load_bytes(pybase64.b64decode(data, validate=True))


_video_cache: DecodedVideoCache | None = None


def video_cache() -> DecodedVideoCache:
    """This process's cache of decoded videos (`ServeLimits.video_cache_bytes`), made on first use."""
    global _video_cache
    if _video_cache is None:
        _video_cache = DecodedVideoCache(ServeLimits.from_env().video_cache_bytes)
    return _video_cache


class IntpVideoLoader:
    """vLLM video loader (VIDEO_LOADER_REGISTRY, name `intp_vllm`): `video.io.sample_video`,
    each frame resized and cropped for the vision tower as it is decoded.

    The plugin makes it the checkpoint's default loader (`plugin.py`), for the server and
    offline `LLM.chat` alike; `media_io_kwargs.video` may set `num_frames`, `frame_size` (the
    tower's input side, set by the plugin; 0 keeps full-size frames), `decoder` (a key of
    `video.io.DECODERS`) and `preprocess_device` (set by the plugin from `intp.preprocess_device`
    when it is not "pillow"). Under `intp-vllm serve` the server's `ServeLimits` apply (and its
    decoder); elsewhere (offline `LLM.chat`) the default limits, with as many frames as asked for.
    vLLM's own OpenCV loader decodes every frame up to the last sampled one, all of them for
    num_frames=-1, at full size, and reads bytes through OpenCV's in-memory stream, which
    segfaults on some malformed mp4 headers (taking the server down).
    """

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, frame_size: int = 0, decoder: str = "pyav",
                   fps: float | None = None, start: float | None = None, end: float | None = None,
                   preprocess_device: str = PILLOW, **kwargs) -> tuple:
        """(uint8 frames (T, H, W, 3), vLLM's video metadata dict) of encoded `data`; `fps`, `start`,
        `end` (set by the processor, core/frame_plan.py) sample by rate and within a time range,
        `num_frames` then being the cap; `preprocess_device` where frames are resized (set by the
        plugin from `intp.preprocess_device`). Raises ValueError naming the option or limit at fault."""
        if kwargs:
            raise ValueError(f"media_io_kwargs.video {sorted(kwargs)} are not supported: this server decodes "
                             "video with the intp_vllm loader, which takes 'num_frames', 'frame_size', 'decoder' and "
                             "'preprocess_device'")
        limits = ServeLimits.from_env().video
        if LIMITS_ENV not in os.environ and isinstance(num_frames, int) and num_frames > limits.max_frames:
            limits = replace(limits, max_frames=num_frames)
        video = sample_video(data, num_frames, limits, decoder=decoder,
                             preprocess=frame_preprocess(frame_size, limits, preprocess_device), fps=fps, start=start,
                             end=end)
        return video.frames, video_metadata(video.total_frames, video.fps, video.indices, video.timestamps)


def frame_preprocess(frame_size: int, limits: VideoLimits, device: str = PILLOW) -> ClipPreprocessConfig | None:
    """The resize and crop of `media_io_kwargs.video.frame_size` (None for 0: frames kept whole),
    on `media_io_kwargs.video.preprocess_device` (`ClipPreprocessConfig.device`). Raises
    ValueError for a size that is not a positive integer or makes frames over the limit of
    pixels, or a device that is not allowed or not on this host."""
    if not frame_size:
        return None
    if isinstance(frame_size, int) and frame_size * frame_size > limits.max_frame_pixels:
        raise ValueError(f"media_io_kwargs.video frame_size {frame_size} makes frames of more than "
                         f"{limits.max_frame_pixels} pixels, this server's limit")
    check_preprocess_device("media_io_kwargs.video preprocess_device", device)
    try:
        return ClipPreprocessConfig(shortest_edge=frame_size, crop_size=frame_size, device=device)
    except ValueError as exc:
        raise ValueError(f"media_io_kwargs.video frame_size: {exc}") from None


def video_metadata(total_frames: int, fps: float, indices: list[int],
                   timestamps: list[float] | None = None) -> dict:
    """vLLM's video metadata dict for frames already sampled by our loader, with the frames' times
    (`timestamps`, seconds from the video's first frame) when known."""
    return {
        "timestamps": timestamps or [],
        "total_num_frames": total_frames,
        "fps": fps,
        "duration": total_frames / fps if fps > 0 else 0.0,
        "video_backend": MEDIA_HOOK_NAME,
        "frames_indices": indices,
        "do_sample_frames": False,
    }


class BoundedMediaConnector:
    """vLLM's MediaConnector (VLLM_MEDIA_CONNECTOR) with video_url checked before it costs memory.

    Checks what vLLM does not: a file's or a data URL's size before reading or decoding
    it, a data URL's encoding, and a total deadline on fetching and decoding (vLLM retries
    a dead host three times with growing timeouts). Every failure becomes a 4xx naming the
    URL as the client sent it: ValueError -> 400, fetch failures -> 422; a 503 when every
    file-read slot is stuck. Files (`file:///abs/path` and RFC 8089's `file://localhost/abs/path`)
    are read here, not by vLLM: regular files only, in `file_read_slots()`, so a read that
    never returns holds one slot, not one of the threads vLLM decodes every video with.
    Video decodes with IntpVideoLoader and the server's decoder, whatever video_backend or
    decoder a request asks for. A video sent as image_url frames (`image_frames.py`) is
    fetched here, frame by frame, through vLLM's image loading. Everything else is vLLM's
    connector unchanged.
    """

    def __init__(self, media_io_kwargs: dict | None = None, **kwargs) -> None:
        from intp_vllm.vllm_ext.internals import MediaConnector

        self.limits = ServeLimits.from_env()
        media_io_kwargs = dict(media_io_kwargs or {})
        media_io_kwargs["video"] = {**media_io_kwargs.get("video", {}), "video_backend": MEDIA_HOOK_NAME,
                                    "decoder": self.limits.video_decoder}
        kwargs.pop("connection", None)
        connection = SafeMediaConnection(self.limits, tuple(kwargs.get("allowed_media_domains") or ()))
        self.inner = MediaConnector(media_io_kwargs, connection, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def fetch_video_async(self, video_url: str, **kwargs):
        """vLLM's fetch, after our checks and within the fetch deadline; errors become 4xx naming
        the URL. A `image_frames.frame_list_url` is fetched frame by frame (`_fetch_frames_async`)."""
        from http import HTTPStatus

        from aiohttp import ClientError
        from intp_vllm.vllm_ext.internals import GracefulHTTPError, VLLMUnprocessableEntityError

        urls = frame_list_urls(video_url)
        what = f"video_url {short_url(video_url)}" if urls is None else f"the {len(urls)} image_url frames"
        frames = len(urls) if urls else self.inner.media_io_kwargs["video"].get("num_frames", 0)
        deadline = self.limits.fetch_deadline_s(frames if isinstance(frames, int) else 0)
        try:
            self._check_before_loading(video_url)
            if urls is not None:
                loading = self._fetch_frames_async(urls)
            elif _is_file_url(video_url):
                loading = self._fetch_file_video_async(video_url, **kwargs)
            elif video_cache().max_bytes:
                loading = self._fetch_content_video_async(video_url, **kwargs)
            else:
                loading = self.inner.fetch_video_async(video_url, **kwargs)
            video = await asyncio.wait_for(loading, deadline)
            if (stamps := VIDEO_TIMESTAMPS.get()) is not None and urls is None:
                stamps.append(getattr(video, "media", video)[1].get("timestamps", []))
            return video
        except TimeoutError:
            raise for_the_client(VLLMUnprocessableEntityError(
                f"{what} {'were' if urls else 'was'} not fetched and decoded within {deadline:g} s "
                f"(--video-fetch-timeout {self.limits.fetch_timeout_s:g} s for up to {FETCH_TIMEOUT_FRAMES} frames, "
                f"pro rata above; {frames} asked); raise --video-fetch-timeout", parameter="video_url")) from None
        except FileReadsStuck as exc:
            raise GracefulHTTPError(f"{what}: {exc}", HTTPStatus.SERVICE_UNAVAILABLE) from None
        except FetchError as exc:  # its message starts with the URL it names
            message = f"video_url {exc}" if urls is None else f"{what}: {exc}"
            if exc.refused:
                raise for_the_client(ValueError(message)) from None
            raise for_the_client(VLLMUnprocessableEntityError(message, parameter="video_url")) from None
        except ValueError as exc:
            raise for_the_client(ValueError(f"{what}: {exc}")) from None
        except OSError as exc:  # missing or unreadable files: the reason, not the resolved path
            raise for_the_client(VLLMUnprocessableEntityError(
                f"{what} could not be fetched: {type(exc).__name__}: {exc.strerror or exc}",
                parameter="video_url")) from None
        except ClientError as exc:  # unreachable hosts, HTTP errors after retries
            raise for_the_client(VLLMUnprocessableEntityError(
                f"{what} could not be fetched: {type(exc).__name__}: {exc}", parameter="video_url")) from None

    def fetch_video(self, video_url: str, **kwargs):
        """vLLM's synchronous fetch (offline `LLM.chat`); frame lists as in `fetch_video_async`."""
        urls = frame_list_urls(video_url)
        if urls is None:
            return self.inner.fetch_video(video_url, **kwargs)
        return frames_video([self.inner.load_from_url(url, io) for url, io in zip(urls, self._frame_ios(urls))])

    async def _fetch_file_video_async(self, url: str, *, image_mode: str | None = "RGB",
                                      video_processor: str | None = None):
        """vLLM's `fetch_video_async` for a file URL, the file read in a slot (`_read_file`) and
        decoded as vLLM decodes fetched bytes: our loader (media_io_kwargs.video names it), on
        vLLM's media threads; from `video_cache()` while the file is unchanged (its path, inode,
        size and mtime) and the sampling is the same. (`video_processor` only picks a loader,
        and ours is forced.)"""
        from intp_vllm.vllm_ext.internals import global_thread_pool

        video_io, sampling = self._video_io(image_mode)
        cache = video_cache()
        if cache.max_bytes:
            _, found = await file_read_slots().run(local_file_stat, *self._file_args(url, self.limits.video.max_bytes))
            if (hit := cache.get(_file_key(found, sampling), "file")) is not None:
                return hit
        data, found = await self._read_file(url, self.limits.video.max_bytes)
        video = await asyncio.get_running_loop().run_in_executor(global_thread_pool, video_io.load_bytes, data)
        cache.put(_file_key(found, sampling), video)
        return video

    async def _fetch_content_video_async(self, url: str, *, image_mode: str | None = "RGB",
                                         video_processor: str | None = None):
        """vLLM's `fetch_video_async` for a data: or http(s) URL, decoded through `video_cache()`
        by the bytes' hash (`ContentCachedVideoIO`): vLLM still decodes the data URL's base64 or
        downloads the http resource (through `SafeMediaConnection`) every time, so a changed
        resource is never served stale; only the decode is skipped."""
        video_io, sampling = self._video_io(image_mode)
        source = "data" if url[:5].lower() == "data:" else "http"
        return await self.inner.load_from_url_async(url, ContentCachedVideoIO(video_io, video_cache(), sampling,
                                                                              source))

    def _video_io(self, image_mode: str | None) -> tuple:
        """(vLLM's VideoMediaIO with our loader and this request's media_io_kwargs, the settings
        that key the decoded-video cache)."""
        from intp_vllm.vllm_ext.internals import ImageMediaIO, VideoMediaIO

        image_kwargs = {"image_mode": image_mode} | self.inner.media_io_kwargs.get("image", {})
        video_io = VideoMediaIO(ImageMediaIO(**image_kwargs), **self.inner.media_io_kwargs["video"])
        return video_io, (image_kwargs, self.inner.media_io_kwargs["video"])

    def _file_args(self, url: str, max_bytes: int) -> tuple[Path, Path, int]:
        """(path, allowed directory, byte limit) of a file URL for `fetch.read_local_file`.
        Raises ValueError for a server without --allowed-local-media-path or a bad URL."""
        allowed = self.inner.allowed_local_media_path
        if allowed is None:
            raise ValueError("file:// URLs are disabled on this server (it was started without "
                             "--allowed-local-media-path)")
        return file_url_path(url), allowed, max_bytes

    async def _read_file(self, url: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
        """The bytes (and `stat`) of a file URL's regular file under --allowed-local-media-path,
        read in one of `file_read_slots()`. Raises ValueError (naming the kind of a path that is
        not a regular file), OSError, FileReadsStuck."""
        return await file_read_slots().run(read_local_file, *self._file_args(url, max_bytes))

    async def _fetch_frames_async(self, urls: list[str]) -> tuple:
        """(uint8 frames (N, S, S, 3), metadata) of N image URLs, fetched at once, in order."""
        return frames_video(await asyncio.gather(*(self._fetch_frame_async(url, io)
                                                   for url, io in zip(urls, self._frame_ios(urls)))))

    async def _fetch_frame_async(self, url: str, io: "FrameImageIO") -> np.ndarray:
        """One frame; a file URL read in a slot (`_read_file`), like a video file."""
        if not _is_file_url(url):
            return await self.inner.load_from_url_async(url, io)
        from intp_vllm.vllm_ext.internals import global_thread_pool

        try:
            data, _ = await self._read_file(url, io.get_max_bytes())
        except ValueError as exc:
            raise ValueError(f"{io.label} {exc}") from None
        return await asyncio.get_running_loop().run_in_executor(global_thread_pool, io.load_bytes, data)

    def _frame_ios(self, urls: list[str]) -> list["FrameImageIO"]:
        """One checked image loader a frame."""
        self.limits.video.check_num_frames(len(urls))
        video_kwargs = self.inner.media_io_kwargs["video"]
        preprocess = frame_preprocess(video_kwargs.get("frame_size", 0), self.limits.video,
                                      video_kwargs.get("preprocess_device", PILLOW))
        per_frame = replace(self.limits.video, max_bytes=max(1, self.limits.video.max_bytes // len(urls)))
        return [FrameImageIO(per_frame, preprocess, f"image_url frame {i} ({short_url(url)})")
                for i, url in enumerate(urls)]

    def _check_before_loading(self, url: str) -> None:
        if url[:5].lower() == "data:":
            self._check_data_url(url)

    def _check_data_url(self, url: str) -> None:
        """vLLM answers a non-base64 data URL with a 501 and decodes `video/jpeg` frame lists
        itself, with no frame or pixel limit: only base64 encoded videos (a `video/*` media
        type) are let through. The container is then found from the bytes, not the subtype."""
        header, _, payload = url.partition(",")
        media_type = header[5:].partition(";")[0].lower()
        if not header.lower().endswith(";base64") or not media_type.startswith("video/") or media_type == "video/jpeg":
            raise ValueError(f"expected a base64 encoded video file, data:video/<type>;base64,<data> (video/mp4, "
                             f"video/webm, video/quicktime, ...; video/jpeg frame lists are not accepted), "
                             f"got data:{header[5:60]!s}")
        self.limits.video.check_size(len(payload.rstrip("=")) * 3 // 4, "the decoded data URL")


def _is_file_url(url: str) -> bool:
    return url[:5].lower() == "file:"


class FrameImageIO:
    """A vLLM media IO (`load_bytes`, `load_base64`, `load_file`, `get_max_bytes`) for one frame
    of a video sent as images: its bytes and size checked against `limits` before it is decoded
    (`limits.max_bytes` is the frame's share of the video's), decoded by vLLM's `ImageMediaIO`
    (RGB, EXIF orientation applied), then resized and cropped as `IntpVideoLoader` does a
    decoded frame. Each load returns uint8 (S, S, 3), or (H, W, 3) without `preprocess`."""

    def __init__(self, limits: VideoLimits, preprocess: ClipPreprocessConfig | None, label: str) -> None:
        from intp_vllm.vllm_ext.internals import ImageMediaIO

        self.image_io = ImageMediaIO(image_mode="RGB")
        self.limits, self.preprocess, self.label = limits, preprocess, label

    def get_max_bytes(self) -> int:
        return self.limits.max_bytes

    def load_bytes(self, data: bytes) -> np.ndarray:
        from io import BytesIO

        from intp_vllm.vllm_ext.internals import open_image

        self.limits.check_size(len(data), self.label)
        try:
            with open_image(BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
        except OSError as exc:
            raise ValueError(f"{self.label} is not an image: {exc}") from None
        if width * height > self.limits.max_frame_pixels:
            raise ValueError(f"{self.label} is {width}x{height} ({width * height} pixels); at most "
                             f"{self.limits.max_frame_pixels} pixels a frame are allowed")
        image = self.image_io.load_bytes(data).media
        return np.asarray(image) if self.preprocess is None else resize_and_crop(image, self.preprocess)

    def load_base64(self, media_type: str, data: str) -> np.ndarray:
        try:
            return self.load_bytes(base64.b64decode(data, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"{self.label} is not valid base64: {exc}") from None

    def load_file(self, filepath: Path) -> np.ndarray:
        self.limits.check_size(filepath.stat().st_size, self.label)
        return self.load_bytes(filepath.read_bytes())


def frames_video(frames: list[np.ndarray]) -> tuple:
    """(uint8 (N, H, W, 3), vLLM's video metadata) of frames in order. Raises ValueError for
    frames of different sizes (possible only with frame_size 0: frames kept whole)."""
    sizes = sorted({frame.shape for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"frames of different sizes {[f'{w}x{h}' for h, w, _ in sizes]}: with "
                         "media_io_kwargs.video frame_size 0 frames are not resized, so they must match")
    return np.stack(frames), video_metadata(len(frames), 0.0, list(range(len(frames))))


class SafeMediaConnection:
    """The `connection` vLLM's MediaConnector downloads http(s) media with, through
    `fetch.fetch_bytes`: only hosts `ServeLimits.media_hosts` allows, redirects checked hop
    by hop, the body capped at the video byte limit, one attempt within the fetch timeout; from
    vLLM 0.33, each chunk received charged to the request's download budget
    (`request_budget`, VLLM_MAX_MEDIA_REQUEST_DOWNLOAD_SIZE_MB over all of a request's media),
    as vLLM's own connection charges it."""

    def __init__(self, limits: ServeLimits, allowed_domains: tuple[str, ...]) -> None:
        self.limits = limits
        self.allowed_domains = allowed_domains

    async def async_get_bytes(self, url: str, *, timeout: float | None = None, allow_redirects: bool = True,
                              max_bytes: int | None = None, request_budget=None) -> bytes:
        """vLLM's `HTTPConnection.async_get_bytes`, through `fetch.fetch_bytes` (vLLM's timeout
        gives way to the server's fetch timeout). `request_budget` is vLLM's
        `MediaRequestDownloadBudget` (0.33+) or None. Raises FetchError, or the budget's
        ValueError once the request's media exceed it."""
        policy = self.limits.media_hosts if allow_redirects else replace(self.limits.media_hosts, max_redirects=0)
        cap = min(self.limits.video.max_bytes, max_bytes or self.limits.video.max_bytes)
        return await fetch_bytes(url, policy=policy, max_bytes=cap, timeout_s=self.limits.fetch_timeout_s,
                                 allowed_domains=self.allowed_domains,
                                 charge=None if request_budget is None else request_budget.charge)

    def get_bytes(self, url: str, **kwargs) -> bytes:
        """The same for vLLM's synchronous fetch path."""
        return asyncio.run(self.async_get_bytes(url, **kwargs))

