"""One job in, one record out: its video fetched (fetch.py, public hosts only, capped) or read,
decoded at the job's frames, the engine request built, the answer or error recorded."""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from intp_vllm.video.fetch import FetchError, HostPolicy, fetch_bytes_sync
from intp_vllm.video.preprocess import ClipPreprocessConfig
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.video.io import VideoLimits
from intp_vllm.apps.batch.jobs import SAMPLING_KEYS, FETCHED_SCHEMES, Job, video_scheme


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for the keys it leaves out, and the limits it must keep to."""

    frames: int
    frame_limit: int
    sampling: dict
    preprocess: ClipPreprocessConfig
    fetch_timeout: float = 60.0
    decoder: str = "pyav"
    max_video_bytes: int = VideoLimits.max_bytes
    media_hosts: HostPolicy = field(default_factory=HostPolicy)


def _short(video: str) -> str:
    """A data: URL can be megabytes long; error messages quote its start and end."""
    return video if len(video) <= 100 else f"{video[:60]}...{video[-20:]}"


def load_video(video: str, frames: int, defaults: JobDefaults):
    """Decode `frames` frames sampled uniformly from a path, an http(s) URL or a data: URL,
    each resized and cropped for the vision tower as it is decoded (uint8 (T, crop, crop, 3))."""
    from intp_vllm.video.io import read_video

    def decode(source):
        return read_video(source, frames, decoder=defaults.decoder, preprocess=defaults.preprocess)

    scheme = video_scheme(video)
    if scheme not in FETCHED_SCHEMES:
        return decode(video)
    if scheme == "data":
        try:
            with urllib.request.urlopen(video) as response:
                data = response.read()
        except Exception as exc:  # noqa: BLE001 - any malformed data: URL fails this job
            raise ValueError(f"cannot read {_short(video)!r}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            data = fetch_bytes_sync(video, policy=defaults.media_hosts, max_bytes=defaults.max_video_bytes,
                                    timeout_s=defaults.fetch_timeout)
        except FetchError as exc:
            raise ValueError(f"cannot read {exc}") from None
    try:
        return decode(data)
    except ValueError as exc:
        raise ValueError(f"{_short(video)!r}: {exc}") from None


def error_record(job: Job, exc: BaseException) -> dict:
    return {"id": job.id, "error": f"{exc}" or type(exc).__name__}


def prepare(job: Job, defaults: JobDefaults):
    """(request, sampling params, frames decoded) for a job, or its error record."""
    from vllm import SamplingParams

    from intp_vllm.vllm_ext.model import REQUEST_FRAMES_KWARG

    frames = job.options.get("frames", defaults.frames)
    try:
        if frames > defaults.frame_limit:
            raise ValueError(f"'frames' {frames} is more than this run allows ({defaults.frame_limit}); "
                             "raise it with --max-frames")
        own = {k: job.options[k] for k in SAMPLING_KEYS if k in job.options}
        params = SamplingParams(**{**defaults.sampling, **own})
        video = load_video(job.video, frames, defaults)
    except Exception as exc:  # noqa: BLE001 - a bad job never stops the run
        return error_record(job, exc)
    request = {"prompt": VIDEO_PROMPT.format(question=job.question), "multi_modal_data": {"video": video},
               "mm_processor_kwargs": {REQUEST_FRAMES_KWARG: frames}}
    return request, params, len(video)


def answer_record(job: Job, output, frames: int) -> dict:
    completion = output.outputs[0]
    return {"id": job.id, "answer": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": len(output.prompt_token_ids), "output_tokens": len(completion.token_ids),
            "frames": frames}
