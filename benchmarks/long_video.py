"""What an hour of video costs: decoding by rate and range, and one request through the engine.

A 60-minute 320x180 H.264 file (30 fps, GOP 250, B-frames; a noise texture panning a pixel every
4 frames), written once with PyAV's libx264 into --work-dir. Then, each in a fresh process (so
its peak RSS growth is its own):

decode   `video.io.sample_video` at 1 fps capped at 256 and 1024 frames over the whole hour,
         and at 1 fps over minutes 10-20 (`start`/`end`, a `#t=600,1200` range), each frame
         resized and cropped to 224 px as it is decoded (Video-LLaVA's input): seconds, frames
         decoded, peak RSS growth; beside one demuxing pass over the packets (the plan's cost).
engine   the committed needle model (assets/needle-video-llava, 56 px, 17 tokens a frame) in
         `vllm.LLM` with --max-frames 1024, asked about the hour as a file:// video_url with
         mm_processor_kwargs {"fps": 1} capped at 1024 (the engine's --max-frames), and {"frames": 256}
         (what 1 fps capped at 256 samples: 256 frames uniform over the hour): prompt
         tokens, seconds to the first token (decoding included; asked twice: the repeat may find the
         video in vLLM's multimodal caches), and the KV cache the prompt takes.

    python -m intp_vllm_benchmarks.long_video     # ~15 min on 2 cores (+ a few minutes writing the file once)
                                                  #   -> benchmarks/results/long_video/long_video.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINUTES, FPS, HEIGHT, WIDTH, GOP = 60, 30, 180, 320, 250
DECODE_CASES = [
    {"name": "hour_1fps_cap256", "num_frames": 256, "fps": 1.0},
    {"name": "hour_1fps_cap1024", "num_frames": 1024, "fps": 1.0},
    {"name": "minutes_10_20_1fps_cap1024", "num_frames": 1024, "fps": 1.0, "start": 600, "end": 1200},
]
ENGINE_CAPS = (256, 1024)


def x264_stream(container, width: int, height: int, fps: int, gop: int, options: dict):
    """A libx264 yuv420p stream in `container` (PyAV), keyframes every `gop` frames exactly (no
    scene-cut keyframes), 2 B-frames, frame k at pts k."""
    stream = container.add_stream("libx264", rate=fps,
                                  options={**options, "x264-params": ":".join(filter(None, [options.get("x264-params"),
                                                                                        "scenecut=0"]))})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, 2
    stream.codec_context.time_base = Fraction(1, fps)
    return stream


def write_hour(path: Path) -> dict:
    """The 60-minute file, frames generated as they are encoded (never all in memory)."""
    import av
    import numpy as np

    texture = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH + 4096, 3), dtype=np.uint8)
    started = time.perf_counter()
    with av.open(str(path), "w") as container:
        stream = x264_stream(container, WIDTH, HEIGHT, FPS, GOP, {"preset": "veryfast", "crf": "28"})
        for k in range(MINUTES * 60 * FPS):
            shift = (k // 4) % 4096
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, shift:shift + WIDTH]), format="rgb24")
            picture.pts = k
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return {"seconds_to_write": round(time.perf_counter() - started, 1), "bytes": path.stat().st_size}


CHILD_DECODE = """
import json, resource, sys, time
from intp_vllm.video.io import sample_video
from intp_vllm.video.preprocess import ClipPreprocessConfig
case = json.loads(sys.argv[1]); path = sys.argv[2]
def rss_kib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
before = rss_kib('VmRSS:')
started = time.perf_counter()
kwargs = {k: case[k] for k in ('fps', 'start', 'end') if k in case}
video = sample_video(path, case['num_frames'], preprocess=ClipPreprocessConfig(), **kwargs)
seconds = time.perf_counter() - started
print(json.dumps({**case, 'seconds': round(seconds, 2), 'frames': len(video.indices),
                  'decoded_frames': video.decoded_frames, 'first_s': round(video.timestamps[0], 3),
                  'last_s': round(video.timestamps[-1], 3), 'frames_bytes': video.frames.nbytes,
                  'peak_rss_growth_mib': round((rss_kib('VmHWM:') - before) / 1024, 1)}))
"""

CHILD_PACKETS = """
import av, sys, time
started = time.perf_counter()
with av.open(sys.argv[1]) as container:
    count = sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
print(round(time.perf_counter() - started, 2), count)
"""


def run_child(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()[-1]


def bench_engine(path: Path) -> list[dict]:
    from vllm import LLM, SamplingParams

    from intp_vllm.core.config import kv_bytes_per_token

    llm = LLM(model=str(ROOT / "assets" / "needle-video-llava"),
              hf_overrides={"intp": {"max_frames": max(ENGINE_CAPS)}},
              allowed_local_media_path=str(path.parent), limit_mm_per_prompt={"video": 1}, max_num_seqs=2, seed=0)
    model_config = llm.llm_engine.model_config
    per_token = kv_bytes_per_token(model_config.hf_config.text_config, model_config.dtype.itemsize)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                             {"type": "text", "text": "What colour flashed?"}]}]
    rows = []
    for cap in ENGINE_CAPS:
        seconds = []
        for _ in range(2):  # the second run of the same request may find it in vLLM's multimodal caches
            started = time.perf_counter()
            # 1 fps over an hour, capped: the cap's count, uniform over the hour (`frames`: the same frames)
            kwargs = {"fps": 1.0} if cap == max(ENGINE_CAPS) else {"frames": cap}
            output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False,
                              mm_processor_kwargs=kwargs)[0]
            seconds.append(round(time.perf_counter() - started, 2))
        rows.append({"cap": cap, "prompt_tokens": len(output.prompt_token_ids), "seconds_first_token": seconds[0],
                     "seconds_first_token_repeated": seconds[1],
                     "kv_cache_mib": round(len(output.prompt_token_ids) * per_token / 2**20, 1)})
        print(rows[-1], flush=True)
    return rows


def machine() -> str:
    """The CPU model and the CPUs this process may use."""
    import os

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {len(os.sched_getaffinity(0))} CPUs"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "long-video")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_video")
    parser.add_argument("--parts", nargs="+", default=["decode", "engine"], choices=["decode", "engine"])
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    path = args.work_dir / "hour-320x180-gop250.mp4"
    out = args.out / "long_video.json"
    report = json.loads(out.read_text()) if out.exists() else {}  # parts run separately add up
    report.update(machine=machine(), video={"path": path.name, "minutes": MINUTES, "fps": FPS,
                                            "size": f"{WIDTH}x{HEIGHT}", "gop": GOP, **report.get("video", {})})
    if not path.exists():
        report["video"].update(write_hour(path))
    report["video"]["bytes"] = path.stat().st_size
    if "decode" in args.parts:
        seconds, packets = run_child(CHILD_PACKETS, str(path)).split()
        report["packet_pass"] = {"seconds": float(seconds), "packets": int(packets)}
        report["decode"] = [json.loads(run_child(CHILD_DECODE, json.dumps(case), str(path))) for case in DECODE_CASES]
        for row in report["decode"]:
            print(row, flush=True)
    if "engine" in args.parts:
        report["engine"] = bench_engine(path)
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
