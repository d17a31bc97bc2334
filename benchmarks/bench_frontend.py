"""Front-end capacity: the CPU core-seconds a request's video costs, beside its GPU time.

Per request the server decodes the sampled frames of the video (PyAV, planned by keyframes),
resizes and centre-crops each to the tower's 224 px as it is decoded (`video.io.sample_video`
with `ClipPreprocessConfig`, what the server's loader does) and normalises them
(`preprocess.normalize`, the model processor's part). This measures that path's CPU time
(user + system of the process, every decoder thread counted: core-seconds) and wall time for
videos written with PyAV's H.264 encoder (libx264 "superfast": CABAC, 3 B-frames, deblocking,
as delivered video has; crf 23, GOP 2 s, 30 fps), at 360p, 720p and 1080p, 1 and 10 minutes
long (a 20-s clip encoded once, its packets repeated: `repeat_h264`), read at 32, 128 and 512
frames. One measurement a case; CPU time is what capacity is made of, and it is less disturbed
than wall time by other jobs on a shared machine.

Beside it, the request's GPU time on Video-LLaVA-7B, estimated from the FLOP model of
`intp-vllm bench` (`apps/bench/flops.py`: CLIP-L/14 on every frame, projector, LM prefill with
causal attention, a 64-token answer) at a stated H100 throughput (`H100_FLOPS`: 40% of the bf16
dense peak, 989 TFLOP/s), for the LM reading every frame's tokens and for the LM reading the
tokens of 32 frames (vLLM's video token pruning: the encoder still sees every frame). "CPU cores
needed per GPU" is core-seconds over GPU-seconds: the cores that keep one GPU busy.

    python benchmarks/bench_frontend.py            # ~10 min on 2 cores (writing the clips: ~3) -> benchmarks/results/
    python benchmarks/bench_frontend.py --quick    # one 10-s 360p video at 32 frames: checks the pipeline
    python benchmarks/bench_frontend.py --concurrency  # 2 concurrent requests at 1 vs 2 threads (GIL released?)

Generated videos are cached in --work-dir (default runs/bench-frontend/, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
LENGTHS_S = (60, 600)
CLIP_S = 20
"""Each video is a 20-s clip encoded once, repeated to its length by `repeat_h264`."""
FRAMES = (32, 128, 512)
FPS = 30
GOP_S = 2
ENCODER_OPTIONS = {"preset": "superfast", "crf": "23"}
H100_BF16_DENSE_PEAK = 989e12
ASSUMED_MFU = 0.4
H100_FLOPS = ASSUMED_MFU * H100_BF16_DENSE_PEAK
"""Stated H100 throughput for the model's FLOPs (FLOP/s)."""
TEXT_TOKENS = 40
"""A question's prompt tokens around the video's."""
OUTPUT_TOKENS = 64
PRUNED_FRAMES = 32
"""The LM reads as many tokens as this many frames (vLLM's video token pruning)."""


def write_h264(path: Path, width: int, height: int, seconds: int) -> Path:
    """A `seconds`-long H.264 MP4 of a smooth texture panning under a moving square, written
    frame by frame (`video.io.write_video` takes the whole clip as one array: minutes of 1080p
    are tens of GB)."""
    import av

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 8 + 2, 2 * width // 8 + 2, 3), dtype=np.uint8)
    canvas = np.asarray(np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8)))  # blocky texture, 2x wide
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options=ENCODER_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP_S * FPS
        side = height // 6
        for k in range(seconds * FPS):
            shift = (2 * k) % width
            frame = np.ascontiguousarray(canvas[:height, shift:shift + width])
            x, y = (7 * k) % (width - side), (3 * k) % (height - side)
            frame[y:y + side, x:x + side] = (255, 64, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def repeat_h264(clip: Path, path: Path, times: int) -> Path:
    """`clip` played `times` times over, as one stream: its packets copied with shifted
    timestamps, no re-encoding (x264's GOPs are closed, each opens with an IDR frame), so a
    10-minute 1080p file costs seconds to write and decodes like 10 minutes of its content."""
    import av

    with av.open(str(clip)) as source, av.open(str(path), "w") as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        packets = [packet for packet in source.demux(stream) if packet.size]
        step = packets[1].duration or round(1 / (FPS * stream.time_base))
        period = max(packet.pts for packet in packets) - min(packet.pts for packet in packets) + step
        for r in range(times):
            for packet in packets:
                copy = av.Packet(bytes(packet))
                copy.pts, copy.dts = packet.pts + r * period, packet.dts + r * period
                copy.duration, copy.is_keyframe, copy.time_base = packet.duration, packet.is_keyframe, packet.time_base
                copy.stream = out
                target.mux(copy)
    return path


def measure(path: Path, frames: int) -> dict:
    """Decode + preprocess `frames` frames of `path` as the server does; CPU and wall seconds."""
    from intp_vllm.video.io import sample_video
    from intp_vllm.video.preprocess import ClipPreprocessConfig, normalize

    config = ClipPreprocessConfig()
    wall, cpu = time.perf_counter(), time.process_time()
    sampled = sample_video(path, frames, preprocess=config)
    pixels = normalize(sampled.frames, config)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert pixels.shape == (len(sampled.indices), 3, 224, 224)
    return {"core_s": cpu, "wall_s": wall, "frames": len(sampled.indices), "decoded_frames": sampled.decoded_frames,
            "total_frames": sampled.total_frames}


def measure_concurrent(path: Path, frames: int, requests: int, workers: int) -> dict:
    """`requests` copies of `measure`'s path (decode, resize and crop, normalise) submitted at
    once to a pool of `workers` threads, as the API server's media pool runs them: wall seconds
    until all finish and the process's core-seconds. With the GIL released in decode, resize and
    normalisation, 2 workers finish 2 requests in about half the wall time of 1 worker on 2 free
    cores, for the same core-seconds."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        wall, cpu = time.perf_counter(), time.process_time()
        results = list(pool.map(measure, [path] * requests, [frames] * requests))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"workers": workers, "requests": requests, "frames": frames, "core_s": cpu, "wall_s": wall,
            "per_request_wall_s": [r["wall_s"] for r in results]}


def concurrency(args) -> None:
    """--concurrency: 2 requests at 1 and 2 workers, alternating, `--repeats` times each."""
    from intp_vllm.machine import machine

    width, height = RESOLUTIONS["720p"]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    path = args.work_dir / "720p-clip-20s.mp4"
    if not path.exists():
        write_h264(path, width, height, CLIP_S)
    measure(path, 8)  # first-call costs
    runs = []
    for _ in range(args.repeats):
        for workers in (1, 2):
            runs.append(measure_concurrent(path, 128, 2, workers))
            print(f"{workers} worker(s): {runs[-1]['wall_s']:.2f} s wall, {runs[-1]['core_s']:.2f} core-s", flush=True)
    summary = {w: {key: float(np.median([r[key] for r in runs if r["workers"] == w])) for key in ("wall_s", "core_s")}
               for w in (1, 2)}
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "load_average_after": load, "video": f"{path.name}: 720p H.264, 20 s (see frontend_capacity.json)",
              "case": "2 requests of 128 frames each, submitted at once to a thread pool of 1 or 2 workers",
              "median": summary, "wall_ratio_1_over_2": summary[1]["wall_s"] / summary[2]["wall_s"], "runs": runs}
    out = ROOT / "benchmarks" / "results" / "frontend_concurrency.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median"]), f"wall 1 / 2 workers: {report['wall_ratio_1_over_2']:.2f}", f"wrote {out}")


def video_llava_7b_shape():
    """Video-LLaVA-7B's shape for the FLOP model (Vicuna-7B, CLIP-L/14 at 224; no weights)."""
    from intp_vllm.apps.bench.flops import ModelShape
    from intp_vllm.research.tiny_model import build_config, build_tokenizer, real_shape_spec

    return ModelShape.from_hf_config(build_config(real_shape_spec(text_layers=32, vision_layers=24),
                                                  build_tokenizer()))


def gpu_seconds(shape, frames: int, lm_frames: int) -> float:
    """Model FLOPs of one request (encoder on `frames` frames, the LM on `lm_frames` frames'
    tokens and a 64-token answer) at `H100_FLOPS`."""
    from intp_vllm.apps.bench.flops import request_flops
    from intp_vllm.core.config import video_tokens

    prompt = video_tokens(lm_frames, 8, shape.tokens_per_frame) + TEXT_TOKENS
    return sum(request_flops(shape, frames, prompt, OUTPUT_TOKENS).values()) / H100_FLOPS


def table(report: dict) -> str:
    lines = ["| video | frames | decoded | core-s | wall s | GPU s, all tokens | cores/GPU | "
             f"GPU s, {PRUNED_FRAMES} frames' tokens | cores/GPU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in report["cases"]:
        length = f"{case['seconds'] // 60} min" if case["seconds"] >= 60 else f"{case['seconds']} s"
        lines.append(f"| {case['resolution']} {length} | {case['frames']} | "
                     f"{case['decoded_frames']} | {case['core_s']:.2f} | {case['wall_s']:.2f} | "
                     f"{case['gpu_s']:.3f} | {case['cores_per_gpu']:.1f} | {case['gpu_s_pruned']:.3f} | "
                     f"{case['cores_per_gpu_pruned']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 10-s 360p video at 32 frames")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-frontend")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "frontend_capacity.json")
    parser.add_argument("--concurrency", action="store_true",
                        help="2 concurrent 128-frame requests on a 720p clip at 1 vs 2 worker threads (GIL check) "
                             "-> benchmarks/results/frontend_concurrency.json")
    parser.add_argument("--repeats", type=int, default=3, help="--concurrency: runs at each worker count")
    args = parser.parse_args()
    if args.concurrency:
        return concurrency(args)
    from intp_vllm.machine import machine

    resolutions = ["360p"] if args.quick else list(RESOLUTIONS)
    lengths, frame_counts = ((10,), (32,)) if args.quick else (LENGTHS_S, FRAMES)
    out = args.out if not args.quick else ROOT / "runs" / "bench-frontend-quick.json"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    shape = video_llava_7b_shape()
    cases, writing = [], {}
    for resolution in resolutions:
        width, height = RESOLUTIONS[resolution]
        for seconds in lengths:
            path = args.work_dir / f"{resolution}-{seconds}s.mp4"
            if not path.exists():
                start = time.perf_counter()
                clip = args.work_dir / f"{resolution}-clip-{min(seconds, CLIP_S)}s.mp4"
                if not clip.exists():
                    write_h264(clip, width, height, min(seconds, CLIP_S))
                repeat_h264(clip, path, max(1, seconds // CLIP_S))
                writing[path.name] = time.perf_counter() - start
                print(f"wrote {path} in {writing[path.name]:.0f} s", flush=True)
            if not cases:  # first-call costs (codec and Pillow set-up) out of the first case
                measure(path, 8)
            for frames in frame_counts:
                case = {"resolution": resolution, "width": width, "height": height, "seconds": seconds,
                        "bytes": path.stat().st_size, **measure(path, frames)}
                case["gpu_s"] = gpu_seconds(shape, frames, frames)
                case["gpu_s_pruned"] = gpu_seconds(shape, frames, min(frames, PRUNED_FRAMES))
                case["cores_per_gpu"] = case["core_s"] / case["gpu_s"]
                case["cores_per_gpu_pruned"] = case["core_s"] / case["gpu_s_pruned"]
                cases.append(case)
                print(f"{resolution} {seconds} s, {frames} frames: {case['core_s']:.2f} core-s "
                      f"({case['wall_s']:.2f} s wall, {case['decoded_frames']} frames decoded); "
                      f"cores/GPU {case['cores_per_gpu']:.1f}, pruned {case['cores_per_gpu_pruned']:.1f}", flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "note": "one measurement a case, on a machine shared with other jobs: core-seconds (CPU time) are "
                "less disturbed by other load than wall seconds, not immune to it",
        "video": {"codec": "libx264", "options": ENCODER_OPTIONS, "fps": FPS, "gop_frames": GOP_S * FPS,
                  "content": "8-px-block texture panning 2 px a frame under a moving square",
                  "clip_s": CLIP_S, "built_by": "a 20-s clip encoded once, its packets repeated to the length"},
        "gpu_model": {"model": "Video-LLaVA-7B (FLOP model of apps/bench/flops.py)", "h100_flops": H100_FLOPS,
                      "assumption": f"{ASSUMED_MFU:.0%} of the H100's {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s "
                                    "bf16 dense peak", "text_tokens": TEXT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                      "pruned_frames": PRUNED_FRAMES},
        "writing_s": writing,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
