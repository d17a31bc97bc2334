"""`intp.preprocess_device`: the torch resize and crop against the exact Pillow path.

speed: milliseconds a frame (wall, and CPU time of all threads) to resize and centre-crop one
360p/720p/1080p RGB frame to 224x224, as the decoder does each frame (`resize_and_crop`),
Pillow against torch on this machine's CPU (torch at 1 thread and at its default), and a 32-frame array through
`preprocess_frames` (resize, crop and normalise; torch 16 frames a call). Medians of repeats,
both paths side by side in one run.

needle: the committed needle model (assets/needle-video-llava, 56 px frames) through vLLM,
engine per path, on the same held-out 32-frame clips of eval-needle's tasks, each frame made
"camera-sized" first so both paths must resize and crop: upscaled 4x with Pillow's bicubic
(224x224) and letterboxed to 16:9 (224x398, grey sides), so each path resizes to 56x99 and
crops the centre. Accuracy with 95% Wilson intervals, the share of clips both paths answer
alike and the exact McNemar p-value of the clips only one gets right; the model's accuracy
on the native 56 px clips (no resize) beside them.

    nice -n 10 python benchmarks/preprocess_device.py --clips 200
    nice -n 10 python benchmarks/preprocess_device.py --only needle --rope-type none --tasks order
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from intp_vllm.machine import machine
from intp_vllm.research.needle import FRAME_SIZE, TASKS
from intp_vllm.research.needle_eval import _ask, _score, cell_clips, discordant, mcnemar_exact
from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.preprocess import ClipPreprocessConfig, preprocess_frames, resize_and_crop

ROOT = Path(__file__).resolve().parents[1]
NEEDLE_MODEL = ROOT / "assets" / "needle-video-llava"
RESOLUTIONS = {"360p": (360, 640), "720p": (720, 1280), "1080p": (1080, 1920)}
UPSCALE = 4
WIDE = 398
"""Letterboxed width of the upscaled 224 px needle frames (16:9)."""


def camera_frames(height: int, width: int, count: int, seed: int = 0) -> np.ndarray:
    """Moving shapes on smooth gradients with sensor-like noise (content does not change the cost
    of either path much; this keeps it camera-like)."""
    rng = np.random.default_rng(seed)
    shapes = moving_shapes_video(num_frames=count, height=height, width=width, seed=seed).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), 128 + 60 * np.sin((x + y) / 50)], -1)
    frames = 0.5 * shapes + 0.5 * gradient + rng.normal(0, 8, shapes.shape).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def median_ms(run, repeats: int) -> tuple[float, float]:
    """(wall ms, CPU ms of this process: every thread's core time) of one `run`, medians."""
    run()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * float(np.median(wall)), 1000 * float(np.median(cpu))


def speed(repeats: int) -> dict:
    import torch

    exact, device = ClipPreprocessConfig(), ClipPreprocessConfig(device="cpu")
    default_threads = torch.get_num_threads()
    rows = {}
    for name, (height, width) in RESOLUTIONS.items():
        frames = camera_frames(height, width, 32)
        row = {}

        def measure(key: str, run, count: int, times: int) -> None:
            wall, cpu = median_ms(run, times)
            row[key] = {"wall_ms_per_frame": round(wall / count, 2), "cpu_ms_per_frame": round(cpu / count, 2)}

        measure("pillow", lambda: [resize_and_crop(f, exact) for f in frames[:4]], 4, repeats)
        measure("pillow_array", lambda: preprocess_frames(frames, exact), len(frames), max(3, repeats // 4))
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            measure(f"torch_cpu_{threads}_threads", lambda: [resize_and_crop(f, device) for f in frames[:4]], 4,
                    repeats)
            measure(f"torch_cpu_{threads}_threads_array", lambda: preprocess_frames(frames, device), len(frames),
                    max(3, repeats // 4))
        torch.set_num_threads(default_threads)
        rows[name] = row
        print(name, rows[name], flush=True)
    return {"what": "medians, ms a frame on this CPU (no GPU), 224x224 output, wall and CPU time (all threads): "
                    "resize_and_crop one frame at a time (the decoder's path); *_array: preprocess_frames on 32 "
                    "frames (resize, crop, normalise)",
            "torch_default_threads": default_threads, "results": rows}


def plot_speed(report: dict, path: Path) -> Path:
    """Bars of CPU ms a frame by resolution, one per path (`speed`'s report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    paths = [key for key in next(iter(rows.values())) if not key.endswith("_array")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(paths)
    for i, key in enumerate(paths):
        ax.bar(np.arange(len(rows)) + i * width, [row[key]["cpu_ms_per_frame"] for row in rows.values()], width,
               label=key.replace("_", " "))
    ax.set_xticks(np.arange(len(rows)) + width * (len(paths) - 1) / 2, list(rows))
    ax.set_ylabel("CPU ms a frame (resize + crop to 224)")
    ax.set_title("Pillow vs torch on this CPU (no GPU measured)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def camera_sized(frames: np.ndarray) -> np.ndarray:
    """56 px needle frames -> (T, 224, 398, 3): Pillow bicubic 4x, letterboxed to 16:9 in grey."""
    side = FRAME_SIZE * UPSCALE
    out = np.full((len(frames), side, WIDE, 3), 128, np.uint8)
    left = (WIDE - side) // 2
    for i, frame in enumerate(frames):
        out[i, :, left:left + side] = np.asarray(Image.fromarray(frame).resize((side, side), Image.Resampling.BICUBIC))
    return out


def needle(clips_per_cell: int, frames: int, seed: int, rope_type: str, tasks: list[str], chunk: int = 50) -> dict:
    from vllm import LLM

    from intp_vllm.vllm_ext.engine import shutdown_llm

    cells = {task: cell_clips(frames, task, clips_per_cell, seed) for task in tasks}
    engine = dict(dtype="float32", max_num_seqs=32, limit_mm_per_prompt={"video": 1}, seed=0)
    results: dict = {task: {} for task in tasks}
    for path in ("pillow", "cpu"):
        llm = LLM(model=str(NEEDLE_MODEL), hf_overrides={"intp": {"frames": frames, "rope_type": rope_type,
                                                                    "preprocess_device": path}},
                  **engine)
        try:
            for task, clips in cells.items():
                start = time.perf_counter()
                asked = [answer for i in range(0, len(clips), chunk)
                         for answer in _ask(llm, [camera_sized(c.frames) for c in clips[i:i + chunk]],
                                            [task] * len(clips[i:i + chunk]))]
                results[task][f"{path}, 224x398 frames"] = _score(asked, clips) | {
                    "seconds": round(time.perf_counter() - start, 1)}
                if path == "pillow":
                    results[task]["native 56 px frames (no resize)"] = _score(
                        _ask(llm, [c.frames for c in clips], [task] * len(clips)), clips)
                print(path, task, {k: v["accuracy"] for k, v in results[task].items()}, flush=True)
        finally:
            shutdown_llm(llm)
    for task, clips in cells.items():
        a, b = (results[task][f"{p}, 224x398 frames"]["answers"] for p in ("pillow", "cpu"))
        only_pillow, only_torch = discordant(a, b, clips)
        results[task]["paired"] = {"same_answer": float(np.mean([x == y for x, y in zip(a, b)])),
                                   "only_pillow_right": only_pillow, "only_torch_right": only_torch,
                                   "mcnemar_p": mcnemar_exact(only_pillow, only_torch)}
    return {"model": str(NEEDLE_MODEL.relative_to(ROOT)), "frames": frames, "clips_per_cell": clips_per_cell,
            "seed": seed, "rope_type": rope_type, "factor": "auto",
            "frames_fed": f"{FRAME_SIZE} px clips upscaled {UPSCALE}x (Pillow bicubic) and letterboxed to "
                          f"{FRAME_SIZE * UPSCALE}x{WIDE}: both paths resize to 56x99 and centre-crop",
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess_device")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clips", type=int, default=200, help="held-out clips per task (needle)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--only", choices=("speed", "needle"))
    parser.add_argument("--rope-type", default="yarn", help="needle: the RoPE extension (written to "
                        "needle.json for yarn, the default, else needle_<type>.json)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"machine": machine(), "load_average": os.getloadavg()}
    if args.only != "needle":
        report = common | speed(args.repeats) | {"load_average_after": os.getloadavg()}
        (args.out / "speed.json").write_text(json.dumps(report, indent=1))
        plot_speed(report, args.out / "speed.png")
    if args.only != "speed":
        started = time.perf_counter()
        report = common | needle(args.clips, args.frames, args.seed, args.rope_type, args.tasks)
        report |= {"seconds": round(time.perf_counter() - started), "load_average_after": os.getloadavg()}
        name = "needle.json" if args.rope_type == "yarn" else f"needle_{args.rope_type}.json"
        (args.out / name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
