"""Jobs of `intp-vllm batch`: the JSONL input, validated line by line (a bad id stops the run, any
other fault becomes the job's error record), where each job's video is, and what a job gets for
the keys it leaves out (`JobDefaults`)."""

from __future__ import annotations

import collections
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from intp_vllm.core.frame_plan import FRAME_KEYS
from intp_vllm.video.fetch import HostPolicy
from intp_vllm.video.io import VideoLimits
from intp_vllm.video.preprocess import ClipPreprocessConfig

REQUIRED_KEYS = ("id", "video", "question")
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed")
OPTIONAL_KEYS = (*SAMPLING_KEYS, *FRAME_KEYS)
"""`frames` or `fps`, `start`/`end`, `max_frames`: which frames a job gets, as a server request's
mm_processor_kwargs (core/frame_plan.py; checked when the job runs, against the run's limits)."""
FETCHED_SCHEMES = ("http", "https", "data")
"""`video` URLs read into memory: http(s) by `fetch.py` (public hosts, capped), data: by urllib;
anything else is a path (file:// URLs become one)."""
MAX_FAULTS_SHOWN = 20
"""Most faulty lines a BatchError lists; the rest are counted."""


class BatchError(Exception):
    """A fault of the run's inputs or flags, found before or between jobs: printed, exit code 2."""


@dataclass(frozen=True)
class Job:
    """A valid line of the jobs file; `video` is a URL or an absolute path."""

    id: str | int
    video: str
    question: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for the keys it leaves out, and the limits it must keep to.

    `frames`: frames a job without its own gets (or `fps`, frames a second, when the run samples
    by rate), `frame_limit`: the most it may ask for (the engine's intp config: --frames, --fps,
    --max-frames or the checkpoint's). `sampling`: SamplingParams
    keywords (SAMPLING_KEYS). `fetch_timeout` in seconds and `max_video_bytes` bound one http(s)
    download; `decoder` is a `video.io` decoder name; `preprocess` resizes and crops the frames.
    """

    frames: int
    frame_limit: int
    sampling: dict
    preprocess: ClipPreprocessConfig
    fetch_timeout: float = 60.0
    decoder: str = "pyav"
    max_video_bytes: int = VideoLimits.max_bytes
    media_hosts: HostPolicy = field(default_factory=HostPolicy)
    fps: float | None = None


def id_key(job_id) -> str:
    """Results are matched to jobs by this key: 1 and "1" are different ids."""
    return json.dumps(job_id)


def _is_valid_id(value) -> bool:
    return (isinstance(value, str) and value != "") or (type(value) is int)


def _option_problems(obj: dict) -> list[str]:
    """Type errors of the optional keys (SamplingParams checks the ranges it cares about)."""
    problems = []
    for name in ("max_tokens", "seed", "frames"):
        value = obj.get(name)
        if value is None:
            continue
        if type(value) is not int:
            problems.append(f"{name!r} must be an integer, got {value!r}")
        elif value < 1 and name != "seed":
            problems.append(f"{name!r} must be at least 1, got {value!r}")
    for name in ("temperature", "top_p"):
        value = obj.get(name)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            problems.append(f"{name!r} must be a number, got {value!r}")
    return problems


def _job_problems(obj: dict) -> list[str]:
    problems = []
    unknown = sorted(set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    for name in ("video", "question"):
        if name not in obj:
            problems.append(f"missing {name!r}")
        elif not isinstance(obj[name], str) or not obj[name].strip():
            problems.append(f"{name!r} must be a non-empty string")
    return problems + _option_problems(obj)


def _parse_line(raw: str) -> dict:
    """The job object of a line; ValueError if it cannot be a job with an id."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("a job must be a JSON object")
    if "id" not in obj:
        raise ValueError("missing 'id'")
    if not _is_valid_id(obj["id"]):
        raise ValueError(f"'id' must be a non-empty string or an integer, got {obj['id']!r}")
    return obj


def parse_jobs(path: Path) -> tuple[list[Job], list[dict]]:
    """The valid jobs of a JSONL file, and error records for jobs with bad fields.

    Lines without a usable id and duplicate ids raise BatchError naming file and lines.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"cannot read jobs file {str(path)!r}: {exc}") from None
    base_dir = Path(path).resolve().parent
    jobs, bad, faults = [], [], []
    lines_of: dict[str, list[int]] = collections.defaultdict(list)
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = _parse_line(raw)
        except ValueError as exc:
            faults.append(f"{path}:{number}: {exc}")
            continue
        lines_of[id_key(obj["id"])].append(number)
        problems = _job_problems(obj)
        if problems:
            bad.append({"id": obj["id"], "error": f"{path}:{number}: " + "; ".join(problems)})
            continue
        options = {k: obj[k] for k in OPTIONAL_KEYS if obj.get(k) is not None}
        jobs.append(Job(obj["id"], resolve_video(obj["video"], base_dir), obj["question"], options))
    faults += [f"{path}: duplicate id {key} on lines {', '.join(map(str, lines))}"
               for key, lines in lines_of.items() if len(lines) > 1]
    if faults:
        shown = faults[:MAX_FAULTS_SHOWN] + [f"... and {len(faults) - MAX_FAULTS_SHOWN} more"] * (
            len(faults) > MAX_FAULTS_SHOWN)
        raise BatchError("each line must be a JSON object with a unique 'id' (results are matched to jobs "
                         "by id); fix these:\n  " + "\n  ".join(shown))
    return jobs, bad


def video_scheme(video: str) -> str:
    """The lower-case URL scheme of a job's `video` ("" for a plain path)."""
    return urllib.parse.urlsplit(video).scheme.lower()


def resolve_video(video: str, base_dir: Path) -> str:
    """URLs stay; file:// URLs and relative paths become absolute paths (relative to the jobs file)."""
    scheme = video_scheme(video)
    if scheme in FETCHED_SCHEMES:
        return video
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(video).path)
    path = Path(video).expanduser()
    return str(path if path.is_absolute() else base_dir / path)
