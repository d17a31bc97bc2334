"""A job's video, decoded for the engine: fetched (`video.fetch`: public hosts only, capped) or read
from a data: URL or a path, then decoded at the job's frames by `video.io.read_video`."""

from __future__ import annotations

import urllib.request

from intp_vllm.apps.batch.jobs import FETCHED_SCHEMES, JobDefaults, video_scheme
from intp_vllm.video.fetch import FetchError, fetch_bytes_sync, short_url


def load_video(video: str, frames: int, defaults: JobDefaults, **sampling):
    """Decode `frames` frames sampled uniformly from a path, an http(s) URL or a data: URL,
    each resized and cropped for the vision tower as it is decoded (`video.io.SampledVideo`,
    frames uint8 (T, crop, crop, 3); T < `frames` when the video has fewer). `sampling`:
    `fps`, `start`, `end` of `video.io.sample_video` (`frames` then being the cap).

    Every fault (a malformed data: URL, a refused or failed download, an undecodable video) is a
    ValueError naming the video, which becomes the job's error record.
    """
    from intp_vllm.video.io import sample_video

    def decode(source):
        return sample_video(source, frames, decoder=defaults.decoder, preprocess=defaults.preprocess, **sampling)

    scheme = video_scheme(video)
    if scheme not in FETCHED_SCHEMES:
        return decode(video)
    if scheme == "data":
        try:
            with urllib.request.urlopen(video) as response:
                data = response.read()
        except Exception as exc:  # noqa: BLE001 - any malformed data: URL fails this job
            raise ValueError(f"cannot read {short_url(video)}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            data = fetch_bytes_sync(video, policy=defaults.media_hosts, max_bytes=defaults.max_video_bytes,
                                    timeout_s=defaults.fetch_timeout)
        except FetchError as exc:
            raise ValueError(f"cannot read {exc}") from None
    try:
        return decode(data)
    except ValueError as exc:
        raise ValueError(f"{short_url(video)}: {exc}") from None
