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

Videos are decoded here with `video.io.read_video` (only the sampled frames, each resized and
cropped for the vision tower as it is decoded), by threads that run ahead of the engine, and reach `LLM.generate` as frame arrays: every kind of `video` takes
the same path, a bad video fails only its own job, and no `allowed_local_media_path` is needed.
"""

from intp_vllm.apps.batch.cli import EXAMPLE, add_batch_arguments, main_batch
from intp_vllm.apps.batch.inputs import JobDefaults, load_video
from intp_vllm.apps.batch.jobs import BatchError, parse_jobs
from intp_vllm.apps.batch.results import load_results

__all__ = ["EXAMPLE", "BatchError", "JobDefaults", "add_batch_arguments", "load_results", "load_video", "main_batch",
           "parse_jobs"]
