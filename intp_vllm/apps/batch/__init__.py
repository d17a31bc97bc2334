"""`intp-vllm batch`: a JSONL of video questions -> a JSONL of answers, resumable, optionally over Ray
(the format, resuming and decoding: `cli.py`'s docstring and `intp-vllm batch --help`).

Modules: `jobs` (the jobs file, validated; JobDefaults), `videos` (a job's video fetched or read,
decoded), `results` (the fsync'd, resumable results file), `runner` (engine requests and records,
chunks, local and Ray replicas), `cli` (flags, help, the run).
"""

from intp_vllm.apps.batch.cli import EXAMPLE, add_batch_arguments, main_batch
from intp_vllm.apps.batch.jobs import BatchError, JobDefaults, parse_jobs
from intp_vllm.apps.batch.results import load_results
from intp_vllm.apps.batch.videos import load_video

__all__ = ["EXAMPLE", "BatchError", "JobDefaults", "add_batch_arguments", "load_results", "load_video", "main_batch",
           "parse_jobs"]
