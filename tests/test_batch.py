"""`intp-vllm batch`: the CLI run as a subprocess with real engines on the tiny checkpoint.

Engine starts dominate the time, so the uninterrupted single-engine run is made once (module
fixture) and is the reference for the kill/resume and Ray runs. That reference run uses vLLM's
default engine-core process; the others run the engine core in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), which starts about 15 s faster here and must give the
same answers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

MAX_TOKENS = 32
"""Enough decoding (~0.5 s a job here) that the killed run is still busy when its 2nd record lands."""
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--max-tokens", str(MAX_TOKENS)]
"""No memory flag: on CPU the plugin sizes the KV cache (vLLM alone would want 92% of node 0)."""
RUN_TIMEOUT_S = 240
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
JOB_IDS = {"j0", "j1", "broken", 3, "j4", "j5"}


def batch_cmd(model_dir, jobs, output, *extra):
    return [sys.executable, "-m", "intp_vllm.apps.cli", "batch", "--model", str(model_dir),
            "--input", str(jobs), "--output", str(output), *ENGINE_FLAGS, *extra]


def run_batch(model_dir, jobs, output, *extra, env=None, check=True):
    proc = subprocess.run(batch_cmd(model_dir, jobs, output, *extra), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_records(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_id(records):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in {ids}"
    return {r["id"]: r for r in records}


def answers(records):
    return {job_id: r.get("answer") for job_id, r in records.items()}


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """6 jobs: mp4 files as relative, absolute, file:// and data: URLs (clip3 twice), one broken file."""
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video

    root = tmp_path_factory.mktemp("batch")
    videos = root / "videos"
    videos.mkdir()
    for i in range(4):
        write_video(videos / f"clip{i}.mp4", moving_shapes_video(num_frames=12 + 6 * i, height=56, width=72, seed=i))
    (videos / "broken.mp4").write_text("this is not a video\n")
    data_url = "data:video/mp4;base64," + base64.b64encode((videos / "clip3.mp4").read_bytes()).decode()
    jobs = [
        {"id": "j0", "video": "videos/clip0.mp4", "question": "What is moving?"},
        {"id": "j1", "video": str(videos / "clip1.mp4"), "question": "What colour is the square?"},
        {"id": "broken", "video": "videos/broken.mp4", "question": "What is moving?"},
        {"id": 3, "video": "videos/clip2.mp4", "question": "Describe the video.", "frames": 4},
        {"id": "j4", "video": data_url, "question": "What is moving?"},
        {"id": "j5", "video": "file://" + str(videos / "clip3.mp4"), "question": "What is moving?", "max_tokens": 3},
    ]
    path = root / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, batch_inputs):
    """The uninterrupted single-engine run: (records by id, its output and logs)."""
    output = batch_inputs.parent / "reference.jsonl"
    started = time.perf_counter()
    proc = run_batch(tiny_model_dir, batch_inputs, output)
    print(f"\nuninterrupted run: {time.perf_counter() - started:.1f} s")
    return by_id(read_records(output)), proc.stderr + proc.stdout  # vLLM logs to stdout


@pytest.mark.engine
def test_answers_and_error_record(reference):
    records, log = reference
    assert "intp_vllm: CPU KV cache 64 MiB (2 sequences of max_model_len" in log
    assert set(records) == JOB_IDS
    assert set(records["broken"]) == {"id", "error"}
    assert "broken.mp4" in records["broken"]["error"] and "not a video" in records["broken"]["error"]
    for job_id in JOB_IDS - {"broken"}:
        record = records[job_id]
        assert set(record) == {"id", "answer", "finish_reason", "prompt_tokens", "output_tokens", "frames",
                               "timestamps"}
        assert len(record["timestamps"]) == record["frames"]
        assert isinstance(record["answer"], str) and 1 <= record["output_tokens"] <= MAX_TOKENS
        assert record["prompt_tokens"] > 8 * 17  # 8 frames' placeholders (17 tokens a frame) + the question
    assert records[3]["frames"] == 4 and records["j0"]["frames"] == 8
    assert records["j5"]["output_tokens"] <= 3
    # the same file as a data: URL and as a file:// URL: same prompt, same greedy start
    assert records["j4"]["prompt_tokens"] == records["j5"]["prompt_tokens"]
    assert records["j4"]["answer"].startswith(records["j5"]["answer"])
    assert "batch: 100%" in log and '"invalid": 0, "run": 6, "failed": 1' in log  # tqdm bar, summary


def kill_after_records(cmd, output, count: int) -> None:
    """Start the run and SIGKILL it (and its engine processes) once `output` has `count` lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **IN_PROCESS_ENGINE})
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if output.exists() and output.read_bytes().count(b"\n") >= count:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.engine
def test_kill_resume_and_cut_line_repair(tiny_model_dir, batch_inputs, reference):
    """SIGKILL after 2 results, then a record cut mid-write; the re-run repairs and completes the file."""
    output = batch_inputs.parent / "killed.jsonl"
    kill_after_records(batch_cmd(tiny_model_dir, batch_inputs, output, "--batch-size", "1"), output, 2)
    partial = by_id(read_records(output))
    assert 2 <= len(partial) < 6, f"{len(partial)} records after the kill"
    missing = next(job_id for job_id in reference[0] if job_id not in partial)
    with open(output, "a") as handle:  # as a kill in the middle of writing a record leaves it
        handle.write(json.dumps(reference[0][missing])[:25])

    rerun = run_batch(tiny_model_dir, batch_inputs, output, "--batch-size", "1", env=IN_PROCESS_ENGINE)
    assert "dropped a cut last line" in rerun.stderr
    assert f"{len(partial)} job(s) already in" in rerun.stderr
    records = by_id(read_records(output))
    assert len(records) == 6
    assert answers(records) == answers(reference[0])


@pytest.mark.engine
def test_ray_two_workers_match_one(tiny_model_dir, batch_inputs, reference):
    output = batch_inputs.parent / "ray.jsonl"
    started = time.perf_counter()
    proc = run_batch(tiny_model_dir, batch_inputs, output, "--ray-workers", "2", "--batch-size", "2",
                     env=IN_PROCESS_ENGINE)
    print(f"\n2 Ray workers: {time.perf_counter() - started:.1f} s")
    assert len(set(re.findall(r"\(Runner pid=(\d+)\)", proc.stderr))) == 2  # two engine actors logged
    records = by_id(read_records(output))
    assert answers(records) == answers(reference[0])
    assert "broken.mp4" in records["broken"]["error"]


# ---- no engine needed


@pytest.mark.engine
def test_faulty_jobs_file_stops_before_the_engine(tiny_model_dir, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": i, "video": "v.mp4", "question": "q"} for i in ("a", "b", "a", 7, 7)]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"video": "v.mp4"}\n[1]\n{oops\n')
    proc = run_batch(tiny_model_dir, jobs, tmp_path / "out.jsonl", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for fault in ('duplicate id "a" on lines 1, 3', "duplicate id 7 on lines 4, 5", ":6: missing 'id'",
                  ":7: a job must be a JSON object", ":8: not valid JSON"):
        assert fault in proc.stderr
    assert str(jobs) in proc.stderr and not (tmp_path / "out.jsonl").exists()


def test_bad_job_fields_become_error_records(tmp_path):
    from intp_vllm.apps.batch import parse_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(job) for job in [
        {"id": "ok", "video": "v.mp4", "question": "q", "frames": 16},
        {"id": "extra", "video": "v.mp4", "question": "q", "fsp": 2},
        {"id": "noq", "video": "v.mp4"},
        {"id": "badtok", "video": "v.mp4", "question": "q", "max_tokens": "many"},
        {"id": "badtemp", "video": "v.mp4", "question": "q", "temperature": True},
    ]) + "\n")
    parsed, bad = parse_jobs(jobs)
    assert [j.id for j in parsed] == ["ok"] and parsed[0].video == str(tmp_path / "v.mp4")
    assert parsed[0].options == {"frames": 16}
    errors = {r["id"]: r["error"] for r in bad}
    assert "unknown key(s) ['fsp']" in errors["extra"]
    assert "missing 'question'" in errors["noq"]
    assert "'max_tokens' must be an integer" in errors["badtok"]
    assert "'temperature' must be a number" in errors["badtemp"]
    assert errors["extra"].startswith(f"{jobs}:2: ")


def test_http_videos_are_fetched_only_from_allowed_hosts_and_capped(tmp_path):
    """batch follows serve's rules for http(s) videos: public hosts (or the opted-in networks),
    every redirect checked, the download stopped at --max-video-bytes."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from intp_vllm.apps.batch import JobDefaults, add_batch_arguments, load_video
    from intp_vllm.video.fetch import HostPolicy
    from intp_vllm.video.preprocess import ClipPreprocessConfig
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video

    clip = write_video(tmp_path / "clip.mp4", moving_shapes_video(num_frames=12, height=48, width=64))
    httpd = ThreadingHTTPServer(("127.0.0.2", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.2:{httpd.server_address[1]}/clip.mp4"
    parser = argparse.ArgumentParser()
    add_batch_arguments(parser)
    args = parser.parse_args(["--model", "m", "--input", "i", "--output", "o", "--allowed-media-networks",
                              "127.0.0.2/32", "--max-video-bytes", str(clip.stat().st_size)])

    def defaults(**changes):
        base = dict(frames=8, frame_limit=8, sampling={}, preprocess=ClipPreprocessConfig(shortest_edge=32,
                    crop_size=32), max_video_bytes=args.max_video_bytes, media_hosts=HostPolicy.from_args(args))
        return JobDefaults(**{**base, **changes})

    try:
        assert load_video(url, 8, defaults()).frames.shape == (8, 32, 32, 3)
        with pytest.raises(ValueError, match=r"refused: 127.0.0.2, a loopback address"):
            load_video(url, 8, defaults(media_hosts=HostPolicy()))
        with pytest.raises(ValueError, match=r"too large: \d+ bytes; at most 100 bytes"):
            load_video(url, 8, defaults(max_video_bytes=100))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_results_file_repair(tmp_path):
    from intp_vllm.apps.batch import BatchError, load_results

    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "a", "answer": "x"}\n{garbage\n{"id": "b", "error": "e"}\n')
    with pytest.raises(BatchError, match=r"out.jsonl:2 is not a result record"):
        load_results(output)
    output.write_text('{"id": "a", "answer": "x"}\n{"id": "b", "err')
    done = load_results(output)
    assert done.keys == {'"a"'} and done.repaired and output.read_text() == '{"id": "a", "answer": "x"}\n'
    output.write_text('{"id": 1, "answer": "x"}')  # whole record, only its newline lost: kept
    assert load_results(output).keys == {"1"} and output.read_text() == '{"id": 1, "answer": "x"}\n'
    output.write_text('{"id": "a", "answer": "x"}\n{"id": "b", "error": "e"}\n')
    assert load_results(output).keys == {'"a"', '"b"'}
    done = load_results(output, retry_errors=True)
    assert done.keys == {'"a"'} and done.rewritten and output.read_text() == '{"id": "a", "answer": "x"}\n'


def test_help_explains_jobs_results_resume_and_ray(capsys):
    from intp_vllm.apps.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["batch", "--help"])
    text = capsys.readouterr().out
    for phrase in ("required: id", "optional: max_tokens", "data:video/mp4;base64", '"error"', "resuming:",
                   "--retry-errors", "--ray-workers", "--ray-address", "--tensor-parallel-size", "--frames"):
        assert phrase in text


def test_pruning_flags_reach_every_replica_s_engine():
    """vLLM's --video-pruning-rate/--video-pruning-method, as batch flags, go to each LLM(); unset stay out."""
    from intp_vllm.apps.batch.cli import engine_kwargs_from
    from intp_vllm.apps.cli import build_parser

    base = ["batch", "--model", "/m", "--input", "in.jsonl", "--output", "out.jsonl"]
    args = build_parser().parse_args([*base, "--video-pruning-rate", "0.75", "--video-pruning-method", "vidcom2"])
    kwargs = engine_kwargs_from(args, {})
    assert kwargs["video_pruning_rate"] == 0.75 and kwargs["video_pruning_method"] == "vidcom2"
    assert "video_pruning_rate" not in engine_kwargs_from(build_parser().parse_args(base), {})
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--video-pruning-method", "fastv"])


def test_an_explicit_max_model_len_past_the_checkpoint_reaches_each_engine_allowed():
    """--max-model-len with --max-frames: each LLM() gets the override that lets vLLM accept it
    (flags.with_long_context); with --rope-type none it does not."""
    from intp_vllm.apps.batch.cli import engine_kwargs_from
    from intp_vllm.apps.cli import build_parser
    from intp_vllm.apps.flags import intp_section

    base = ["batch", "--model", "/m", "--input", "in.jsonl", "--output", "out.jsonl", "--max-frames", "1024",
            "--fps", "1"]
    args = build_parser().parse_args([*base, "--max-model-len", "20000"])
    assert intp_section(args) == {"max_frames": 1024, "fps": 1.0}
    assert engine_kwargs_from(args, intp_section(args))["hf_overrides"] == {
        "intp": {"max_frames": 1024, "fps": 1.0}, "text_config": {"model_max_length": 20000}}
    plain = build_parser().parse_args([*base, "--max-model-len", "20000", "--rope-type", "none"])
    assert "text_config" not in engine_kwargs_from(plain, intp_section(plain))["hf_overrides"]
    no_length = engine_kwargs_from(build_parser().parse_args(base), {"max_frames": 1024})
    assert "text_config" not in no_length["hf_overrides"]


def test_jobs_sample_by_rate_and_range_as_server_requests_do(tmp_path):
    """A job's fps/start/end pick the frames (frame-exact on an index-coded video) and its record
    gets their timestamps; conflicting or out-of-range values fail that job alone, naming the key."""
    from intp_vllm.apps.batch import JobDefaults
    from intp_vllm.apps.batch.jobs import Job
    from intp_vllm.apps.batch.runner import prepare
    from intp_vllm.core.rearrange import uniform_frame_indices
    from intp_vllm.research.synthetic import decode_frame_index, index_coded_video
    from intp_vllm.video.io import write_video
    from intp_vllm.video.preprocess import ClipPreprocessConfig

    clip = str(write_video(tmp_path / "clip.mp4", index_coded_video(300, 72, 96), fps=30, gop=30))  # 10 s
    defaults = JobDefaults(frames=8, frame_limit=64, sampling={}, preprocess=ClipPreprocessConfig(shortest_edge=72,
                           crop_size=72))

    def run(**options):
        return prepare(Job("j", clip, "q", options), defaults)

    request, _, timestamps = run(start="0:02", end=4)
    expected = (60 + uniform_frame_indices(60, 8)).tolist()
    assert decode_frame_index(request["multi_modal_data"]["video"]) == expected
    assert timestamps == pytest.approx([i / 30 for i in expected], abs=1e-3)
    request, _, timestamps = run(fps=2)  # 10 s at 2 fps
    assert len(timestamps) == 20 and request["mm_processor_kwargs"] == {"frames": 64}
    request, _, timestamps = run(fps=30)  # capped at the run's --max-frames
    assert len(timestamps) == 64
    fps_run = JobDefaults(**{**defaults.__dict__, "fps": 0.5})
    assert len(prepare(Job("j", clip, "q", {}), fps_run)[2]) == 5  # the run's --fps
    assert len(prepare(Job("j", clip, "q", {"frames": 3}), fps_run)[2]) == 3  # a job's count wins
    assert run(frames=8, fps=1)["error"] == ("job frames=8 and job fps=1 conflict: a video is sampled by count or by "
                                             "rate; send one of them")
    assert "job end=1 must be after job start=2" in run(start=2, end=1)["error"]
    assert "start=12 s is at or past the end of video file" in run(start=12)["error"]
    assert "job frames=65: expected an integer from 1 to 64" in run(frames=65)["error"]
