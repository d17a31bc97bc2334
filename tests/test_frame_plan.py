"""The one decision of which frames a request gets (core/frame_plan.py): count, rate, range, cap."""

from __future__ import annotations

import pytest

from intp_vllm.core.frame_plan import FramePlan, FrameRequest, parse_time, parse_time_fragment


def request(kwargs=None, default_frames=8, limit=64, default_fps=None) -> FrameRequest:
    return FrameRequest.from_kwargs(kwargs, default_frames=default_frames, limit=limit, default_fps=default_fps)


def test_a_count_is_that_many_frames_over_the_whole_video():
    assert request({"frames": 32}).plan(600.0) == FramePlan(32, 0.0, 600.0)
    assert request().plan(600.0) == FramePlan(8, 0.0, 600.0)
    assert request({"frames": 32}).whole_video and request({"frames": 32}).cap == 32


def test_a_rate_is_span_times_fps_capped_by_max_frames():
    assert request({"fps": 1}, limit=1024).plan(600.0) == FramePlan(600, 0.0, 600.0)  # 10 minutes at 1 fps
    assert request({"fps": 1}, limit=128).plan(600.0).count == 128
    assert request({"fps": 0.01}).plan(10.0).count == 1  # at least one frame
    assert request({"fps": 2, "start": 10, "end": 20}).plan(600.0) == FramePlan(20, 10.0, 20.0)
    assert request({"fps": 1}, limit=128).cap == 128


def test_the_server_rate_is_the_default_and_a_request_count_wins_over_it():
    assert request(default_fps=0.5, limit=1024).plan(3600.0).count == 1024
    assert request(default_fps=0.5, limit=4096).plan(3600.0).count == 1800
    assert request({"frames": 16}, default_fps=0.5).plan(3600.0).count == 16


def test_a_range_is_clamped_at_the_end_and_refused_past_it():
    assert request({"start": "10:00", "end": "0:20:00"}).plan(900.0) == FramePlan(8, 600.0, 900.0)
    assert request({"end": 1200}).plan(3600.0) == FramePlan(8, 0.0, 1200.0)
    with pytest.raises(ValueError, match=r"start=700 s is at or past the end of the video \(600 s long\)"):
        request({"start": 700}).plan(600.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": 8, "fps": 1}, r"mm_processor_kwargs.frames=8 and mm_processor_kwargs.fps=1 conflict"),
    ({"frames": 65}, r"mm_processor_kwargs.frames=65: expected an integer from 1 to 64"),
    ({"frames": True}, r"mm_processor_kwargs.frames=True"),
    ({"fps": 0}, r"mm_processor_kwargs.fps=0: expected frames a second of video, a number > 0"),
    ({"fps": float("nan")}, r"mm_processor_kwargs.fps=nan"),
    ({"fps": "1"}, r"mm_processor_kwargs.fps='1'"),
    ({"start": -1}, r"mm_processor_kwargs.start=-1: expected a time >= 0 s"),
    ({"start": "ten"}, r"mm_processor_kwargs.start='ten': expected seconds"),
    ({"end": "1:75"}, r"mm_processor_kwargs.end='1:75': minutes and seconds must be below 60"),
    ({"start": 20, "end": 10}, r"mm_processor_kwargs.end=10 must be after mm_processor_kwargs.start=20"),
    ({"start": 10, "end": 10}, r"must be after"),
])
def test_conflicting_and_out_of_range_values_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        request(kwargs)


@pytest.mark.parametrize("text, seconds", [
    ("600", 600.0), ("600.5", 600.5), ("10:00", 600.0), ("0:10:00", 600.0), ("1:00:00.25", 3600.25), (75, 75.0),
])
def test_times_are_seconds_or_clock_times(text, seconds):
    assert parse_time(text, "start") == seconds


@pytest.mark.parametrize("url, expected", [
    ("http://h/v.mp4#t=600,1200", ("http://h/v.mp4", 600.0, 1200.0)),
    ("http://h/v.mp4#t=npt:10:00,00:20:00", ("http://h/v.mp4", 600.0, 1200.0)),
    ("http://h/v.mp4#t=,1200", ("http://h/v.mp4", None, 1200.0)),
    ("http://h/v.mp4#t=600", ("http://h/v.mp4", 600.0, None)),
    ("file:///d/v.mp4#xywh=0,0,10,10&t=5,6", ("file:///d/v.mp4#xywh=0,0,10,10", 5.0, 6.0)),
    ("http://h/v.mp4#chapter", ("http://h/v.mp4#chapter", None, None)),
    ("http://h/v.mp4", ("http://h/v.mp4", None, None)),
    ("data:video/mp4;base64,AAAA#t=1,2", ("data:video/mp4;base64,AAAA", 1.0, 2.0)),
])
def test_media_fragments_give_the_url_and_its_range(url, expected):
    assert parse_time_fragment(url) == expected


@pytest.mark.parametrize("url, message", [
    ("v.mp4#t=20,10", r"the end \(10 s\) must be after the start \(20 s\)"),
    ("v.mp4#t=abc", r"video_url #t start='abc': expected seconds"),
    ("v.mp4#t=1,2:70", r"video_url #t end='2:70': minutes and seconds must be below 60"),
    ("v.mp4#t=5,", r"the end after ',' is missing"),
    ("v.mp4#t=1&t=2", r"more than one t= time range"),
])
def test_malformed_fragments_are_refused_naming_the_fragment(url, message):
    with pytest.raises(ValueError, match=message):
        parse_time_fragment(url)


def test_loader_kwargs_carry_only_what_was_asked():
    assert request({"frames": 16}).loader_kwargs() == {"num_frames": 16}
    assert request({"fps": 1, "start": 5}, limit=256).loader_kwargs() == {"num_frames": 256, "fps": 1.0, "start": 5.0}


def test_a_request_caps_its_own_rate_with_max_frames():
    assert request({"fps": 1, "max_frames": 256}, limit=1024).plan(3600.0) == FramePlan(256, 0.0, 3600.0)
    assert request({"fps": 1, "max_frames": 256}, limit=1024).loader_kwargs() == {"num_frames": 256, "fps": 1.0}
    assert request({"fps": 1, "max_frames": 900}, limit=1024).plan(600.0).count == 600  # under the cap
    assert request({"max_frames": 4}).plan(60.0).count == 4  # the default count (8) capped
    assert request({"frames": 16, "max_frames": 16}).plan(60.0).count == 16
    assert request(default_fps=1.0, limit=1024).cap == 1024 and request({"max_frames": 64}, default_fps=1.0,
                                                                        limit=1024).plan(3600.0).count == 64


@pytest.mark.parametrize("kwargs, message", [
    ({"fps": 1, "max_frames": 2048}, r"mm_processor_kwargs.max_frames=2048: expected an integer from 1 to 1024, "
                                     r"the server's --max-frames"),
    ({"max_frames": 0}, r"mm_processor_kwargs.max_frames=0: expected an integer from 1 to 1024"),
    ({"max_frames": "64"}, r"mm_processor_kwargs.max_frames='64'"),
    ({"frames": 300, "max_frames": 256}, r"mm_processor_kwargs.frames=300 is above mm_processor_kwargs.max_frames=256"),
])
def test_a_request_cap_above_the_server_is_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        request(kwargs, limit=1024)
