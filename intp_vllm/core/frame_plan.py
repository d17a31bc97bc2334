"""Which frames of a video a request gets: by count, by rate, within a time range. Decided here, once.

A request names at most one of
- `frames`: n frames, or
- `fps`: frames a second of video (span x fps, rounded, at least 1),
capped by the request's own `max_frames` (at most `limit`, intp.max_frames; `limit` when it names
none), and optionally a time range `start`/`end` in seconds from the video's first frame (or a
W3C media fragment on its URL, `#t=600,1200`, `#t=10:00,20:00`, `#t=,1200`, `#t=600`:
`parse_time_fragment`). The frames are then spread evenly in time over
the span, first and last frame of the span included (video/io.py decodes exactly those, and
nothing after the span; before it, only from the keyframe that the span's first frame needs).
The encoder-window rule (pad by repeating the last frame, rearrange.py) applies afterwards.

`FrameRequest.from_kwargs` checks what a request sent (each fault a ValueError naming the field
and what is allowed) before anything is fetched; `FrameRequest.plan` turns it into a count and a
span once the video's duration is known (after the demuxing pass, before any frame is decoded),
and refuses a range that starts past the video's end. An `end` past the end is clamped, as
media fragments are.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

FRAMES_KEY, FPS_KEY, START_KEY, END_KEY, MAX_FRAMES_KEY = "frames", "fps", "start", "end", "max_frames"
FRAME_KEYS = (FRAMES_KEY, FPS_KEY, START_KEY, END_KEY, MAX_FRAMES_KEY)
"""The request fields (mm_processor_kwargs, batch job keys, media_io_kwargs.video) this module reads."""
TIME_FORMAT = "seconds (e.g. 600 or 600.5) or [hh:]mm:ss[.frac] (e.g. 10:00 or 0:10:00)"
_CLOCK = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")
_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


def parse_time(value, name: str) -> float:
    """Seconds >= 0 from a number or a string in `TIME_FORMAT` (a media fragment's npt time).
    Raises ValueError naming `name`."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected {TIME_FORMAT}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and _SECONDS.match(value.strip()):
        seconds = float(value.strip())
    elif isinstance(value, str) and (clock := _CLOCK.match(value.strip())):
        hours, minutes, secs = clock.groups()
        if int(minutes) >= 60 or float(secs) >= 60:
            raise ValueError(f"{name}={value!r}: minutes and seconds must be below 60; expected {TIME_FORMAT}")
        seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
    else:
        raise ValueError(f"{name}={value!r}: expected {TIME_FORMAT}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r}: expected a time >= 0 s, {TIME_FORMAT}")
    return seconds


def parse_time_fragment(url: str) -> tuple[str, float | None, float | None]:
    """(`url` without its `t=` media fragment, start, end) of a video URL.

    W3C Media Fragments temporal dimension: `#t=[npt:]start[,end]`, either side may be left
    out (`#t=,1200`: from the beginning; `#t=600`: to the end); other fragment parameters
    (`&`-separated) are kept. (url, None, None) when there is no `t=`. Raises ValueError for
    a malformed time or an end not after the start, naming the fragment.
    """
    base, hash_, fragment = url.partition("#")
    if not hash_:
        return url, None, None
    params = fragment.split("&")
    times = [p for p in params if p.startswith("t=")]
    if not times:
        return url, None, None
    if len(times) > 1:
        raise ValueError(f"video_url fragment #{fragment[:80]}: more than one t= time range")
    value = urllib.parse.unquote(times[0][2:])
    if value.startswith("npt:"):
        value = value[4:]
    first, comma, second = value.partition(",")
    what = f"video_url fragment #t={times[0][2:][:60]}"
    if not first and not second:
        raise ValueError(f"{what}: expected t=start[,end] in {TIME_FORMAT}")
    start = parse_time(first, "video_url #t start") if first else None
    end = parse_time(second, "video_url #t end") if comma and second else None
    if comma and not second:
        raise ValueError(f"{what}: the end after ',' is missing; expected t=start[,end] or t=,end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{what}: the end ({end:g} s) must be after the start ({start:g} s)")
    rest = [p for p in params if not p.startswith("t=")]
    return base + ("#" + "&".join(rest) if rest else ""), start, end


@dataclass(frozen=True)
class FramePlan:
    """What to decode: `count` frames spread evenly over [start, end] seconds from the video's first frame."""

    count: int
    start: float
    end: float


@dataclass(frozen=True)
class FrameRequest:
    """A request's frame choice, checked: a count (`frames`) or a rate (`fps`), a range, a cap.

    `frames`: a count 1..limit, or None when sampling by `fps` (frames a second, > 0).
    `start`/`end`: seconds from the video's first frame (None: its beginning / end).
    `limit`: the most frames: the request's `max_frames`, else intp.max_frames.
    """

    frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    limit: int = 1

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object] | None, *, default_frames: int, limit: int,
                    default_fps: float | None = None, prefix: str = "mm_processor_kwargs.") -> "FrameRequest":
        """A request's `frames`/`fps`/`start`/`end` (those it leaves out: `default_frames`, or
        `default_fps` when the server samples by rate; a request's `frames` wins over the
        server's rate). A request's `max_frames` (1..limit) caps its count: the frames a rate gives,
        and the default count. Raises ValueError naming `prefix` + the field and what is allowed:
        `frames` or `max_frames` outside 1..limit, `frames` above `max_frames`, `fps` not a number
        > 0, both `frames` and `fps`, a time that is not one (`TIME_FORMAT`), an `end` not after `start`."""
        kwargs = kwargs or {}
        frames, fps = kwargs.get(FRAMES_KEY), kwargs.get(FPS_KEY)
        cap = kwargs.get(MAX_FRAMES_KEY)
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= limit:
                raise ValueError(f"{prefix}{MAX_FRAMES_KEY}={cap!r}: expected an integer from 1 to {limit}, the "
                                 "server's --max-frames (intp.max_frames)")
            if frames is not None and not isinstance(frames, bool) and isinstance(frames, int) and frames > cap:
                raise ValueError(f"{prefix}{FRAMES_KEY}={frames!r} is above {prefix}{MAX_FRAMES_KEY}={cap!r}: "
                                 f"ask for at most {cap} frames, or raise {MAX_FRAMES_KEY}")
            limit, default_frames = cap, min(default_frames, cap)
        if frames is not None and fps is not None:
            raise ValueError(f"{prefix}{FRAMES_KEY}={frames!r} and {prefix}{FPS_KEY}={fps!r} conflict: a video is "
                             f"sampled by count or by rate; send one of them")
        if frames is not None:
            if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= limit:
                raise ValueError(f"{prefix}{FRAMES_KEY}={frames!r}: expected an integer from 1 to {limit} "
                                 "(intp.max_frames)")
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
                raise ValueError(f"{prefix}{FPS_KEY}={fps!r}: expected frames a second of video, a number > 0 "
                                 f"(the count is then capped at {limit}: max_frames)")
            fps = float(fps)
        if frames is None and fps is None:
            frames, fps = (None, default_fps) if default_fps else (default_frames, None)
        start = None if kwargs.get(START_KEY) is None else parse_time(kwargs[START_KEY], prefix + START_KEY)
        end = None if kwargs.get(END_KEY) is None else parse_time(kwargs[END_KEY], prefix + END_KEY)
        if start is not None and end is not None and end <= start:
            raise ValueError(f"{prefix}{END_KEY}={kwargs[END_KEY]!r} must be after {prefix}{START_KEY}="
                             f"{kwargs[START_KEY]!r}: a time range runs forward")
        return cls(frames, fps, start, end, limit)

    @property
    def cap(self) -> int:
        """The most frames this request can get: its count, or `limit` when sampling by rate."""
        return self.frames if self.frames is not None else self.limit

    @property
    def whole_video(self) -> bool:
        """Whether it samples the whole video by count (what a frame array or a plain loader does)."""
        return self.fps is None and self.start is None and self.end is None

    def loader_kwargs(self) -> dict[str, object]:
        """The keys a video loader needs (media_io_kwargs.video): `num_frames` (the cap), and
        `fps`, `start`, `end` where set."""
        extra = {FPS_KEY: self.fps, START_KEY: self.start, END_KEY: self.end}
        return {"num_frames": self.cap, **{k: v for k, v in extra.items() if v is not None}}

    def plan(self, duration: float, label: str = "the video") -> FramePlan:
        """The frames of a video of `duration` seconds (first frame to the end of the last):
        how many, over which span. Raises ValueError when `start` is at or past the end."""
        start = self.start or 0.0
        if start > 0 and start >= duration:
            raise ValueError(f"{START_KEY}={start:g} s is at or past the end of {label} ({duration:g} s long); "
                             f"expected a start below {duration:g} s")
        end = duration if self.end is None else min(self.end, duration)
        if self.frames is not None:
            return FramePlan(self.frames, start, end)
        return FramePlan(max(1, min(self.limit, round((end - start) * self.fps))), start, end)
