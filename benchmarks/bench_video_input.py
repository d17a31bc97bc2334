"""Video input path: decoding, CLIP preprocessing, memory and one served request, side by side.

Four parts, each timed against its baselines in the same run (interleaved a, b, c, a, b, c,
...; the median of --repeats), so load on a shared machine hits every method alike:

decode      Generated videos (`synthetic.index_coded_video` under a moving texture, written
            with PyAV's encoders by `video.io.write_video`): 1080p H.264 (GOP 30, B-frames)
            20 s, 360p H.264 GOP 250 2 min, HEVC and VP9 at 720p 20 s, all 30 fps. At each
            of --frames frames, per video:
              ours_pyav              video.io.sample_video(bytes, n, decoder="pyav")
              ours_pyav_preprocess   the same with ClipPreprocessConfig() (224 crop while decoding:
                                     what the server does)
              ours_opencv            sample_video(bytes, n, decoder="opencv")
              vllm_opencv            vLLM's VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(bytes, num_frames=n)
              pyav_one_pass          limit for dense sampling: one threaded PyAV pass decoding every
                                     frame, converting only the n targets to RGB (to_ndarray rgb24)
                                     into one preallocated array, as ours does
              pyav_seek_per_target   limit for sparse sampling: for each target, seek to its
                                     keyframe and decode forward to it (threaded), convert it (same)
              pyav_packet_pass       demuxing every packet, no decoding (what ours adds to plan)
            The baselines get the target timestamps and keyframes for free (computed before
            timing). Ours' indices are checked against vLLM's, and every method's frames
            against the indices coded in their pixels.
preprocess  One frame at 1080p and at 360p: ours (preprocess.resize_and_crop + normalize) vs HF
            transformers' CLIPImageProcessorPil, checked bit-exact, and the previous numpy
            re-implementation of Pillow's resampler (commit 5286953, loaded from `git show`
            into a temporary module outside the repo; needs the git history).
memory      Peak RSS growth (VmHWM) of a fresh process: an 8-frame 3000x4 video with
            preprocessing (refused for its 750:1 aspect ratio; time to the refusal), and 32
            frames of the 1080p clip with and without preprocessing.
serve       `intp-vllm serve` on the tiny checkpoint (--frames 32): one chat completion
            (max_tokens 1) about the 20-s 1080p clip as a file:// URL, against one PyAV pass
            (to_ndarray) + 32 Pillow resize-and-crops at the checkpoint's size; the server's RSS growth
            during the request (VmHWM of each of its processes, reset before the request).

Goals (issue 11) are reported pass/fail with the measured ratio in the JSON's "goals".

    python -m intp_vllm_benchmarks.bench_video_input            # ~30 min on 2 cores (+5 min writing the videos once)
                                                                 #   -> benchmarks/results/video_input.{json,png}
    python -m intp_vllm_benchmarks.bench_video_input --quick    # ~1 min smoke run -> runs/bench-video-input-quick/
    python -m intp_vllm_benchmarks.bench_video_input --replot   # redraw the PNG, print the tables from the JSON
    python -m intp_vllm_benchmarks.bench_video_input --parts decode preprocess --frames 8 32

Generated videos are cached in --work-dir (default runs/bench-video-input/, git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OLD_PREPROCESS_COMMIT = "5286953"
PARTS = ("decode", "preprocess", "memory", "serve")
DECODE_METHODS = ("ours_pyav", "ours_pyav_preprocess", "ours_opencv", "vllm_opencv", "pyav_one_pass",
                  "pyav_seek_per_target", "pyav_packet_pass")
KV_CACHE_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------
# Videos


@dataclass(frozen=True)
class VideoSpec:
    name: str
    width: int
    height: int
    seconds: float
    codec: str
    ext: str
    gop: int | None
    b_frames: int | None
    options: dict = field(default_factory=dict)
    fps: int = 30

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    @property
    def label(self) -> str:
        codec = {"libx264": "H.264", "libx265": "HEVC", "libvpx-vp9": "VP9"}.get(self.codec, self.codec)
        length = f"{self.seconds / 60:g} min" if self.seconds >= 60 else f"{self.seconds:.3g} s"
        bframes = f", {self.b_frames} B" if self.b_frames else ""
        return f"{codec} {self.height}p {length}, GOP {self.gop}{bframes}"

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


X264 = {"preset": "veryfast"}
X265 = {"preset": "veryfast", "x265-params": "log-level=error"}
VP9 = {"deadline": "realtime", "cpu-used": "8"}


def video_specs(quick: bool) -> list[VideoSpec]:
    if quick:
        return [VideoSpec("h264_1080p", 1920, 1080, 2 / 3, "libx264", "mp4", 10, 2, X264),
                VideoSpec("h264_360p_long_gop", 640, 360, 5, "libx264", "mp4", 100, 2, X264),
                VideoSpec("hevc_360p", 640, 360, 2, "libx265", "mp4", 30, 2, X265),
                VideoSpec("vp9_360p", 640, 360, 2, "libvpx-vp9", "webm", 30, None, VP9)]
    return [VideoSpec("h264_1080p_20s", 1920, 1080, 20, "libx264", "mp4", 30, 2, X264),
            VideoSpec("h264_360p_2min", 640, 360, 120, "libx264", "mp4", 250, 2, X264),
            VideoSpec("hevc_720p_20s", 1280, 720, 20, "libx265", "mp4", 60, 2, X265),
            VideoSpec("vp9_720p_20s", 1280, 720, 20, "libvpx-vp9", "webm", 60, None, VP9)]


def textured_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`index_coded_video` at 3/4 contrast under a smooth random texture moving 3 px a frame
    (in place, no second copy): encoders see camera-like motion and detail, so bitrates are
    realistic (about 9 Mbit/s at 1080p with x264 veryfast), and the coded index survives."""
    from PIL import Image

    from intp_vllm.research.synthetic import index_coded_video

    frames = index_coded_video(num_frames, height, width)
    small = np.random.default_rng(seed).integers(0, 256, (max(height // 8, 2), max(width // 8, 2)), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)) // 4
    for k in range(num_frames):
        frame = frames[k]
        frame -= frame // 4
        frame += np.roll(texture, 3 * k, axis=1)[..., None]
    return frames


def ensure_video(spec: VideoSpec, work_dir: Path, log=print) -> tuple[Path, dict]:
    """The video for `spec`, written once into `work_dir` (cached by its parameters)."""
    from intp_vllm.video.io import write_video

    path = work_dir / f"{spec.name}-{spec.key()}.{spec.ext}"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    log(f"writing {spec.label} ({spec.num_frames} frames {spec.width}x{spec.height}) -> {path}")
    started = time.perf_counter()
    frames = textured_frames(spec.num_frames, spec.height, spec.width)
    generated = time.perf_counter()
    write_video(path, frames, spec.fps, codec=spec.codec, gop=spec.gop, b_frames=spec.b_frames,
                options=dict(spec.options))
    del frames
    gc.collect()
    meta = {"generate_s": round(generated - started, 1), "encode_s": round(time.perf_counter() - generated, 1),
            "bytes": path.stat().st_size,
            "mbit_per_s": round(path.stat().st_size * 8 / spec.seconds / 1e6, 2)}
    meta_path.write_text(json.dumps(meta))
    log(f"  {meta}")
    return path, meta


@dataclass
class PacketIndex:
    """Presentation timestamps of every packet (sorted) and of the keyframes, from a demux pass."""

    pts: np.ndarray
    keyframes: np.ndarray


def packet_index(data: bytes) -> PacketIndex:
    import av

    pts, keys = [], []
    with av.open(io.BytesIO(data)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size and packet.pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
    return PacketIndex(np.sort(np.asarray(pts, np.int64)), np.sort(np.asarray(keys, np.int64)))


# ---------------------------------------------------------------------------------------------
# Decoders and baselines: each returns {"indices", "decoded", "frames"}


def run_ours(data: bytes, n: int, decoder: str, preprocess=None) -> dict:
    from intp_vllm.video.io import sample_video

    video = sample_video(data, n, decoder=decoder, preprocess=preprocess)
    # OpenCV does not report it; since 02ca8c2 it grabs forward up to the last sampled frame, as vLLM's loader
    decoded = video.decoded_frames if decoder == "pyav" else max(video.indices) + 1
    return {"indices": list(video.indices), "decoded": decoded, "frames": video.frames, "total": video.total_frames}


def run_vllm_opencv(data: bytes, n: int) -> dict:
    from intp_vllm.vllm_ext.internals import VIDEO_LOADER_REGISTRY

    frames, meta = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(data, num_frames=n)
    indices = list(meta["frames_indices"])
    # it grabs (decodes) every frame up to the last sampled one
    return {"indices": indices, "decoded": max(indices) + 1, "frames": frames, "total": meta["total_num_frames"]}


class Frames:
    """Frames written into one array allocated at the first (as ours does since 02ca8c2: no
    np.stack copy, so the baselines do no more work than ours)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.array, self.count = capacity, None, 0

    def append(self, frame: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.capacity, *frame.shape), np.uint8)
        self.array[self.count] = frame
        self.count += 1

    def result(self) -> np.ndarray:
        return self.array[: self.count]


def pyav_one_pass(data: bytes, targets: list[int], transform=None) -> dict:
    """Every frame decoded (threaded); the frames at presentation positions `targets` converted
    to RGB with to_ndarray("rgb24") (and handed to `transform`, e.g. a resize and crop), written
    into one array."""
    import av

    wanted, decoded = set(targets), 0
    frames = Frames(len(wanted))
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            decoded += 1
            if position in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                frames.append(transform(rgb) if transform else rgb)
    return {"indices": sorted(wanted), "decoded": decoded, "frames": frames.result()}


def pyav_seek_per_target(data: bytes, targets: list[int], index: PacketIndex) -> dict:
    """For each target: seek to the keyframe at or before it, decode forward to it (threaded)."""
    import av

    frames, decoded, restarts = Frames(len(targets)), 0, 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for target in targets:
            pts = int(index.pts[target])
            keyframe = int(index.keyframes[max(np.searchsorted(index.keyframes, pts, side="right") - 1, 0)])
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            got = None
            for frame in container.decode(stream):
                decoded += 1
                if frame.pts is None or frame.pts < pts:
                    continue
                if frame.pts > pts and got is None and restarts < len(targets):  # landed past it: from the start
                    restarts += 1
                    container.seek(int(index.pts[0]), stream=stream, backward=True, any_frame=False)
                    continue
                got = frame
                break
            frames.append(got.to_ndarray(format="rgb24"))
    return {"indices": list(targets), "decoded": decoded, "frames": frames.result(), "restarts": restarts}


def pyav_packet_pass(data: bytes) -> dict:
    index = packet_index(data)
    return {"indices": None, "decoded": 0, "frames": None, "packets": len(index.pts)}


def coded_indices(frames) -> list[int]:
    """The frame index each full-size frame shows in its pixels (one frame at a time, subsampled)."""
    from intp_vllm.research.synthetic import decode_frame_index

    return [decode_frame_index(np.asarray(frame)[None, ::2, ::2])[0] for frame in frames]


def interleaved(fns: dict, repeats: int, on_first=None) -> dict:
    """Seconds of each callable over `repeats` round-robin rounds; `on_first(name, result)` sees
    each callable's first result (checks), after its timing. Returns {name: [seconds, ...]}."""
    times = {name: [] for name in fns}
    for round_index in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            started = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - started)
            if round_index == 0 and on_first:
                on_first(name, result)
            del result
    return times


def median(values) -> float:
    return round(statistics.median(values), 4)


# ---------------------------------------------------------------------------------------------
# Part 1: decoding


def bench_decode(args, log=print) -> list[dict]:
    from intp_vllm.video.preprocess import ClipPreprocessConfig
    from intp_vllm.core.rearrange import uniform_frame_indices

    config = ClipPreprocessConfig()
    rows = []
    for spec in video_specs(args.quick):
        path, meta = ensure_video(spec, args.work_dir, log)
        data = path.read_bytes()
        index = packet_index(data)
        total, keyframes = len(index.pts), len(index.keyframes)
        log(f"{spec.label}: {total} frames, {keyframes} keyframes, {meta['mbit_per_s']} Mbit/s")
        warm = True
        for n in args.frames:
            targets = uniform_frame_indices(total, n).tolist()
            fns = {
                "ours_pyav": lambda: run_ours(data, n, "pyav"),
                "ours_pyav_preprocess": lambda: run_ours(data, n, "pyav", config),
                "ours_opencv": lambda: run_ours(data, n, "opencv"),
                "vllm_opencv": lambda: run_vllm_opencv(data, n),
                "pyav_one_pass": lambda: pyav_one_pass(data, targets),
                "pyav_seek_per_target": lambda: pyav_seek_per_target(data, targets, index),
                "pyav_packet_pass": lambda: pyav_packet_pass(data),
            }
            if warm and not args.quick:  # codecs, OpenCV and vLLM imports loaded before anything is timed
                interleaved(fns, 1)
                warm = False
            info = {}

            def check(name, result):
                entry = {"decoded_frames": result.get("decoded")}
                if result.get("indices") is not None:
                    entry["indices"] = result["indices"]
                    if name != "ours_pyav_preprocess":
                        entry["pixels_show_indices"] = coded_indices(result["frames"]) == result["indices"]
                for key in ("total", "restarts"):
                    if key in result:
                        entry[key] = result[key]
                info[name] = entry

            times = interleaved(fns, args.repeats, check)
            seconds = {name: median(ts) for name, ts in times.items()}
            vllm_indices = info["vllm_opencv"]["indices"]
            row = {
                "video": spec.name, "label": spec.label, "codec": spec.codec, "width": spec.width,
                "height": spec.height, "fps": spec.fps, "gop": spec.gop, "total_frames": total, "keyframes": keyframes,
                "mbit_per_s": meta["mbit_per_s"], "frames": n,
                "regime": "dense" if n > keyframes else "sparse",
                "seconds": seconds, "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
                "decoded_frames": {name: entry["decoded_frames"] for name, entry in info.items()},
                "ours_indices_equal_vllm": info["ours_pyav"]["indices"] == vllm_indices,
                "ours_opencv_indices_equal_vllm": info["ours_opencv"]["indices"] == vllm_indices,
                "ours_preprocess_indices_equal_vllm": info["ours_pyav_preprocess"]["indices"] == vllm_indices,
                "vllm_indices_uniform": vllm_indices == targets,
                "pixels_show_indices": {name: entry["pixels_show_indices"] for name, entry in info.items()
                                        if "pixels_show_indices" in entry},
                "total_frames_reported": {name: entry["total"] for name, entry in info.items() if "total" in entry},
                "seek_restarts": info["pyav_seek_per_target"].get("restarts", 0),
                "ratio": {
                    "ours_vs_one_pass": round(seconds["ours_pyav"] / seconds["pyav_one_pass"], 3),
                    "ours_vs_seek_per_target": round(seconds["ours_pyav"] / seconds["pyav_seek_per_target"], 3),
                    "ours_vs_best_limit": round(seconds["ours_pyav"] / min(seconds["pyav_one_pass"],
                                                                           seconds["pyav_seek_per_target"]), 3),
                    "ours_preprocess_vs_ours": round(seconds["ours_pyav_preprocess"] / seconds["ours_pyav"], 3),
                    "vllm_opencv_vs_ours": round(seconds["vllm_opencv"] / seconds["ours_pyav"], 2),
                    "vllm_opencv_vs_ours_preprocess": round(seconds["vllm_opencv"]
                                                            / seconds["ours_pyav_preprocess"], 2),
                    "ours_opencv_vs_ours": round(seconds["ours_opencv"] / seconds["ours_pyav"], 2),
                },
            }
            rows.append(row)
            log(f"  n={n:4d} {row['regime']:6s} " + " | ".join(f"{k} {v:.3f}" for k, v in seconds.items())
                + f"  decoded ours {row['decoded_frames']['ours_pyav']}; indices = vLLM: "
                f"{row['ours_indices_equal_vllm']}")
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: preprocessing


def load_old_preprocess(tmp_dir: Path):
    """The numpy Pillow-resampler re-implementation as of OLD_PREPROCESS_COMMIT, as a module
    written outside the repo (None when the git history is not there)."""
    import importlib.util

    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_PREPROCESS_COMMIT}:intp_vllm/preprocess.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp_dir / f"old_preprocess_{OLD_PREPROCESS_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def bench_preprocess(args, log=print) -> list[dict]:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from PIL import Image

    from intp_vllm.video.preprocess import ClipPreprocessConfig, normalize, resize_and_crop, shortest_edge_size

    config = ClipPreprocessConfig()
    hf = CLIPImageProcessorPil()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_preprocess(Path(tmp))
        old_config = old.ClipPreprocessConfig() if old else None
        for height, width in ((1080, 1920), (360, 640)):
            frames = list(textured_frames(args.preprocess_frames, height, width, seed=1))
            size = shortest_edge_size(height, width, config.shortest_edge)[::-1]
            images = {id(frame): Image.fromarray(frame) for frame in frames}
            fns = {
                "ours_resize_crop_normalize": lambda f: normalize(resize_and_crop(f, config)[None], config),
                "ours_resize_crop_only": lambda f: resize_and_crop(f, config),
                # the floor of any HF-exact implementation: Pillow's bicubic resize alone, of a PIL image
                "pillow_resize_only": lambda f: images[id(f)].resize(size, Image.Resampling.BICUBIC),
                "hf_clip_pil": lambda f: hf(images=[f], return_tensors="np")["pixel_values"],
            }
            if old:
                fns["old_numpy_5286953"] = lambda f: old.preprocess_frames(f[None], old_config)
            for fn in fns.values():  # warm-up
                fn(frames[0])
            times = {name: [] for name in fns}
            exact, old_max_diff = True, 0.0
            for repeat in range(args.repeats):
                for frame in frames:
                    outputs = {}
                    for name, fn in fns.items():
                        if name == "old_numpy_5286953" and repeat > 0:
                            continue  # one-off: a single timing per frame
                        started = time.perf_counter()
                        outputs[name] = fn(frame)
                        times[name].append(time.perf_counter() - started)
                    if repeat == 0:
                        exact &= bool(np.array_equal(outputs["ours_resize_crop_normalize"], outputs["hf_clip_pil"]))
                        if old:
                            old_max_diff = max(old_max_diff, float(np.abs(outputs["old_numpy_5286953"]
                                                                          - outputs["hf_clip_pil"]).max()))
            ms = {name: round(statistics.median(ts) * 1e3, 3) for name, ts in times.items()}
            row = {"resolution": f"{width}x{height}", "frames": len(frames), "ms_per_frame": ms,
                   "ours_equals_hf_exactly": exact,
                   "hf_vs_ours": round(ms["hf_clip_pil"] / ms["ours_resize_crop_normalize"], 2)}
            if old:
                row["old_vs_ours"] = round(ms["old_numpy_5286953"] / ms["ours_resize_crop_normalize"], 1)
                row["old_max_abs_diff_vs_hf"] = old_max_diff
            rows.append(row)
            log(f"preprocess {row['resolution']}: " + " | ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                + f"; ours == HF: {exact}")
    return rows


# ---------------------------------------------------------------------------------------------
# Part 3: memory of a fresh process

PEAK_RSS_SCRIPT = """
import json, sys, time
from intp_vllm.video.preprocess import ClipPreprocessConfig
from intp_vllm.video.io import sample_video

def peak_rss():  # VmHWM: this process's own peak
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

path, n, preprocess = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
data = open(path, "rb").read()
sample_video(data, 1)  # load the codec before measuring
before = peak_rss()
started, error, shape = time.perf_counter(), None, None
try:
    shape = list(sample_video(data, n, preprocess=ClipPreprocessConfig() if preprocess else None).frames.shape)
except ValueError as exc:
    error = str(exc)
seconds = time.perf_counter() - started
print(json.dumps({"peak_rss_growth_bytes": peak_rss() - before, "peak_rss_bytes": peak_rss(),
                  "seconds": seconds, "error": error, "shape": shape}))
"""


def peak_rss_growth(path: Path, n: int, preprocess: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), str(n), "1" if preprocess else "0"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_memory(args, log=print) -> list[dict]:
    from intp_vllm.video.io import write_video

    thin = args.work_dir / "thin-3000x4.mp4"
    if not thin.exists():
        frames = np.random.default_rng(3).integers(0, 256, (8, 4, 3000, 3), dtype=np.uint8)
        write_video(thin, frames, 8, codec="libx264", pix_fmt="yuv420p")
    clip, _ = ensure_video(video_specs(args.quick)[0], args.work_dir, log)
    cases = [("3000x4, 8 frames, preprocess", thin, 8, True),
             ("1080p 32 frames, preprocess", clip, 32, True),
             ("1080p 32 frames, no preprocess", clip, 32, False)]
    rows = []
    for label, path, n, preprocess in cases:
        result = peak_rss_growth(path, n, preprocess)
        row = {"case": label, "video": path.name, "frames": n, "preprocess": preprocess,
               "peak_rss_growth_mib": round(result["peak_rss_growth_bytes"] / 2**20, 1),
               "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20, 1), "seconds": round(result["seconds"], 4),
               "refused": result["error"], "shape": result["shape"]}
        rows.append(row)
        log(f"memory {label}: +{row['peak_rss_growth_mib']} MiB in {row['seconds']:.3f} s"
            + (f" (refused: {row['refused']})" if row["refused"] else f" -> {row['shape']}"))
    return rows


# ---------------------------------------------------------------------------------------------
# Part 4: one request through `intp-vllm serve`


def _server_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True)]


def _status_kib(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(field_name + ":")[1].split()[0])


def _reset_peaks(processes) -> bool:
    """Reset each process's VmHWM to its current RSS (Linux clear_refs 5)."""
    try:
        for process in processes:
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_serve(args, log=print) -> dict:
    import psutil
    import requests

    from intp_vllm.video.preprocess import ClipPreprocessConfig, normalize, resize_and_crop
    from intp_vllm.core.rearrange import uniform_frame_indices
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.research.tiny_model import make_tiny_model
    from intp_vllm.video.io import write_video
    from intp_vllm_benchmarks.load_test import chat_request, serve, served_model

    frames = 32
    spec = video_specs(args.quick)[0]
    clip, _ = ensure_video(spec, args.work_dir, log)
    warmup = write_video(args.work_dir / "warmup.mp4", moving_shapes_video(num_frames=24, height=72, width=100, seed=7))
    model_dir = args.work_dir / "tiny-model"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir)
    vision = json.loads((model_dir / "config.json").read_text())["vision_config"]
    config = ClipPreprocessConfig(shortest_edge=vision["image_size"], crop_size=vision["image_size"])
    data = clip.read_bytes()
    targets = uniform_frame_indices(len(packet_index(data).pts), frames).tolist()

    def baseline():
        out = pyav_one_pass(data, targets, transform=lambda rgb: resize_and_crop(rgb, config))
        return normalize(out["frames"], config)

    server_args = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
                   "--max-num-seqs", "1", "--seed", "0", "--allowed-local-media-path", str(args.work_dir),
                   "--frames", str(frames), "--max-video-frames", "64",
                   "--mm-processor-cache-gb", "0", "--no-enable-prefix-caching"]
    started = time.perf_counter()
    with serve(model_dir, server_args) as base_url:
        startup_s = time.perf_counter() - started
        model = served_model(base_url)
        processes = _server_processes()
        log(f"server up in {startup_s:.0f} s: processes {[p.pid for p in processes]}")

        def ask(path: Path) -> dict:
            body = chat_request(model, f"file://{path.resolve()}", max_tokens=1)
            response = requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
            if response.status_code != 200:
                raise RuntimeError(f"request failed: {response.status_code} {response.text[:2000]}")
            return response.json()

        ask(warmup)
        ask(warmup)
        # memory: RSS before, VmHWM reset, one request, VmHWM after (and RSS sampled every 10 ms)
        rss_before = {p.pid: p.memory_info().rss for p in processes}
        hwm_reset = _reset_peaks(processes)
        sampled_peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                total = 0
                for p in processes:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                sampled_peak[0] = max(sampled_peak[0], total)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        first_started = time.perf_counter()
        answer = ask(clip)
        first_s = time.perf_counter() - first_started
        stop.set()
        sampler.join()
        growth = {}
        for p in processes:
            name = " ".join(p.cmdline()[:3])[:80]
            hwm = _status_kib(p.pid, "VmHWM") * 1024
            growth[f"{p.pid} {name}"] = round((hwm - rss_before[p.pid]) / 2**20, 1)
        times = interleaved({"request": lambda: ask(clip), "pyav_pass_plus_resizes": baseline}, args.repeats)
    seconds = {name: median(ts) for name, ts in times.items()}
    result = {
        "video": clip.name, "label": spec.label, "frames": frames, "preprocess_size": config.crop_size,
        "startup_s": round(startup_s, 1),
        "server_args": server_args, "seconds": seconds,
        "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "first_request_s": round(first_s, 4), "prompt_tokens": answer["usage"]["prompt_tokens"],
        "ratio_request_vs_baseline": round(seconds["request"] / seconds["pyav_pass_plus_resizes"], 3),
        "rss_growth_mib_per_process": growth, "rss_growth_mib_total": round(sum(growth.values()), 1),
        "rss_sampled_peak_growth_mib": round((sampled_peak[0] - sum(rss_before.values())) / 2**20, 1),
        "hwm_reset": hwm_reset,
        "server_commit": _git_head(),
    }
    log(f"serve: request {seconds['request']:.3f} s vs pass + {frames} resizes "
        f"{seconds['pyav_pass_plus_resizes']:.3f} s (x{result['ratio_request_vs_baseline']}); "
        f"{result['prompt_tokens']} prompt tokens; RSS growth {growth}")
    return result


def _git_dirty() -> list[str]:
    """Product files that differ from the commit (another change in progress is measured with them)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "intp_vllm"], capture_output=True,
                              text=True, check=True).stdout.split("\n")[:-1]
    except (OSError, subprocess.CalledProcessError):
        return []


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()[:200]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Goals, report, plot


def goal(name: str, measured: float, threshold: float, better: str) -> dict:
    passed = measured <= threshold if better == "lower" else measured >= threshold
    return {"goal": name, "measured": measured, "threshold": threshold,
            "pass": bool(passed), "target": ("<= " if better == "lower" else ">= ") + f"{threshold:g}"}


def goals(report: dict) -> list[dict]:
    out = []
    for row in report.get("decode", []):
        where = f"{row['label']}, {row['frames']} frames"
        if row["regime"] == "dense":
            out.append(goal(f"decode <= 1.2x one threaded PyAV pass (dense: {row['frames']} targets > "
                            f"{row['keyframes']} keyframes): {where}", row["ratio"]["ours_vs_one_pass"], 1.2, "lower"))
        else:
            out.append(goal(f"decode <= 1.2x a seek per target (sparse: {row['frames']} targets <= "
                            f"{row['keyframes']} keyframes): {where}", row["ratio"]["ours_vs_seek_per_target"], 1.2,
                            "lower"))
        out.append(goal(f"same indices as vLLM's OpenCV loader: {where}",
                        float(row["ours_indices_equal_vllm"] and row["ours_preprocess_indices_equal_vllm"]), 1,
                        "higher"))
    decode = report.get("decode", [])
    longest = max((row["total_frames"] for row in decode), default=None)
    for row in [row for row in decode if row["total_frames"] == longest and row["frames"] == 8]:
        out.append(goal(f">= 4x faster than vLLM's OpenCV loader, 8 frames of {row['label']}",
                        row["ratio"]["vllm_opencv_vs_ours"], 4, "higher"))
    for row in report.get("preprocess", []):
        out.append(goal(f"preprocessing bit-exact with HF at {row['resolution']}",
                        float(row["ours_equals_hf_exactly"]), 1, "higher"))
        if row["resolution"] == "1920x1080" and "old_vs_ours" in row:
            out.append(goal("preprocessing >= 20x faster than the numpy resampler (5286953) at 1080p",
                            row["old_vs_ours"], 20, "higher"))
    for row in report.get("memory", []):
        if row["case"].startswith("3000x4"):
            out.append(goal("3000x4 video with preprocessing refused in < 1 s", row["seconds"] if row["refused"]
                            else float("inf"), 1, "lower"))
        elif row["preprocess"]:
            out.append(goal(f"peak RSS growth, {row['case']}: well under 512 MiB", row["peak_rss_growth_mib"],
                            512, "lower"))
    if report.get("serve"):
        out.append(goal(f"served request <= 1.5x (one PyAV pass + 32 Pillow resizes), {report['serve']['label']}, "
                        "32 frames",
                        report["serve"]["ratio_request_vs_baseline"], 1.5, "lower"))
    return out


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    decode = report.get("decode", [])
    videos = list(dict.fromkeys(row["video"] for row in decode))
    panels = len(videos) + bool(report.get("preprocess")) + bool(report.get("serve"))
    cols = 3
    rows_n = max(1, -(-panels // cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), squeeze=False)
    axes = axes.ravel()
    colors = plt.get_cmap("tab10").colors
    methods = [m for m in DECODE_METHODS if m != "pyav_packet_pass"]
    for ax, video in zip(axes, videos):
        rows = [row for row in decode if row["video"] == video]
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [row["seconds"][method] for row in rows], width, label=method, color=colors[m])
        ax.set_xticks(range(len(rows)), [f"{row['frames']} ({row['regime']})" for row in rows])
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median)")
        ax.set_xlabel("sampled frames")
        ax.set_title(f"{rows[0]['label']}\n{rows[0]['total_frames']} frames, {rows[0]['keyframes']} keyframes, "
                     f"{rows[0]['mbit_per_s']} Mbit/s", fontsize=8)
    if videos:
        axes[0].legend(fontsize=6)
    k = len(videos)
    if report.get("preprocess"):
        ax = axes[k]
        k += 1
        rows = report["preprocess"]
        names = list(rows[0]["ms_per_frame"])
        width = 0.8 / len(names)
        for m, name in enumerate(names):
            xs = [i + (m - (len(names) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [row["ms_per_frame"].get(name, np.nan) for row in rows], width, label=name, color=colors[m])
        ax.set_xticks(range(len(rows)), [row["resolution"] for row in rows])
        ax.set_yscale("log")
        ax.set_ylabel("ms per frame (median)")
        ax.set_title("CLIP preprocessing of one frame to 224x224", fontsize=8)
        ax.legend(fontsize=6)
    if report.get("serve"):
        ax = axes[k]
        k += 1
        serve_report = report["serve"]
        names = list(serve_report["seconds"])
        ax.bar(names, [serve_report["seconds"][n] for n in names], color=colors[:len(names)])
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"intp-vllm serve: {serve_report['label']}, {serve_report['frames']} frames, max_tokens 1\n"
                     f"request / baseline = {serve_report['ratio_request_vs_baseline']}", fontsize=8)
    for ax in axes[:k]:
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""))
            ax.tick_params(axis="y", which="minor", labelsize=6)
    for ax in axes[k:]:
        ax.axis("off")
    fig.suptitle(f"Video input - {report['machine']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(report: dict) -> str:
    """Markdown tables of the results (for docs/benchmarks.md)."""
    lines = []
    if report.get("decode"):
        lines += ["| video | frames | regime | ours pyav | ours + preprocess | ours opencv | vLLM opencv | "
                  "one pass | seek/target | packet pass | ours / limit | vLLM / ours | decoded (ours / pass) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in report["decode"]:
            s = row["seconds"]
            limit = row["ratio"]["ours_vs_one_pass" if row["regime"] == "dense" else "ours_vs_seek_per_target"]
            lines.append(f"| {row['label']} | {row['frames']} | {row['regime']} | {s['ours_pyav']:.3f} | "
                         f"{s['ours_pyav_preprocess']:.3f} | {s['ours_opencv']:.3f} | {s['vllm_opencv']:.3f} | "
                         f"{s['pyav_one_pass']:.3f} | {s['pyav_seek_per_target']:.3f} | {s['pyav_packet_pass']:.3f} | "
                         f"{limit:.2f} | {row['ratio']['vllm_opencv_vs_ours']:.1f} | "
                         f"{row['decoded_frames']['ours_pyav']} / {row['decoded_frames']['pyav_one_pass']} |")
    if report.get("preprocess"):
        names = list(report["preprocess"][0]["ms_per_frame"])
        lines += ["", "| frame | " + " | ".join(f"{n} ms" for n in names) + " | HF / ours | old / ours | ours == HF |",
                  "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | --- |"]
        for row in report["preprocess"]:
            lines.append(f"| {row['resolution']} | " + " | ".join(f"{row['ms_per_frame'].get(n, float('nan')):.2f}"
                                                             for n in names)
                         + f" | {row['hf_vs_ours']} | {row.get('old_vs_ours', '-')} | "
                         f"{row['ours_equals_hf_exactly']} |")
    if report.get("memory"):
        lines += ["", "| case | peak RSS growth MiB | seconds | outcome |", "| --- | ---: | ---: | --- |"]
        for row in report["memory"]:
            outcome = "ValueError (aspect ratio)" if row["refused"] else f"frames {row['shape']}"
            lines.append(f"| {row['case']} | {row['peak_rss_growth_mib']} | {row['seconds']:.3f} | {outcome} |")
    if report.get("goals"):
        lines += ["", "| goal | measured | target | pass |", "| --- | ---: | --- | --- |"]
        for g in report["goals"]:
            lines.append(f"| {g['goal']} | {g['measured']:.3g} | {g['target']} | {'PASS' if g['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def memory_pages() -> dict:
    """How fresh memory is backed: the full-size frame arrays (128 x 720p = 354 MB) are first
    touched while timed, and numpy asks for transparent huge pages (madvise) for large arrays.
    On the KVM/firecracker machine of docs/benchmarks.md a huge-page first touch of 354 MB took
    either 0.05 s or 2-5 s of kernel time, alternating call to call (4 KiB pages, with
    NUMPY_MADVISE_HUGEPAGE=0: a steady 0.3 s), which lands on whichever method runs then."""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = None
    return {"transparent_hugepage": thp, "NUMPY_MADVISE_HUGEPAGE": os.environ.get("NUMPY_MADVISE_HUGEPAGE")}


def versions() -> dict:
    import av
    import cv2
    import PIL
    import transformers

    info = {"av": av.__version__, "ffmpeg": av.library_versions.get("libavcodec"), "opencv": cv2.__version__,
            "pillow": PIL.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    try:
        from intp_vllm.vllm_ext.internals import vllm_version

        info["vllm"] = vllm_version()
    except ImportError:
        pass
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min once its videos are cached): 0.7-5 s videos (1080p, 360p GOP 100, "
                        "HEVC and VP9 at 360p), 8 and 16 frames, 1 repeat, no warm-up, no server; writes to "
                        "runs/bench-video-input-quick/ unless --out is given. Not for numbers")
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="what to measure (default: all; quick: all but serve, whose server takes ~50 s to "
                        "start on 2 cores: `--quick --parts decode preprocess memory serve` smoke-tests every "
                        "part in ~2 min)")
    parser.add_argument("--frames", type=int, nargs="+", help="frame counts sampled (default 8 32 128; quick: 8 16)")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement, median reported (default 3; "
                        "quick: 1)")
    parser.add_argument("--preprocess-frames", type=int, default=4, help="distinct frames per resolution (part "
                        "preprocess; each timed --repeats times, the old numpy resampler once)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-video-input",
                        help="where generated videos and the tiny checkpoint are cached")
    parser.add_argument("--out", type=Path, help="folder for video_input.json and video_input.png "
                        "(default benchmarks/results/; quick: runs/bench-video-input-quick/)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG and print the tables from "
                        "the JSON already in --out")
    args = parser.parse_args(argv)
    args.frames = args.frames or ([8, 16] if args.quick else [8, 32, 128])
    args.parts = args.parts or ([p for p in PARTS if p != "serve"] if args.quick else list(PARTS))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.out = args.out or (ROOT / "runs" / "bench-video-input-quick" if args.quick
                            else ROOT / "benchmarks" / "results")
    if args.quick:
        args.work_dir = args.work_dir / "quick"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    json_path, png_path = args.out / "video_input.json", args.out / "video_input.png"
    if args.replot:
        report = json.loads(json_path.read_text())
        plot(report, png_path)
        print(table(report))
        print(f"wrote {png_path}")
        return report
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from intp_vllm.machine import machine

    report = {"benchmark": "video_input", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {**machine(), "platform": platform.platform(), "memory_pages": memory_pages()},
              "versions": versions(),
              "commit": _git_head(), "uncommitted": _git_dirty(), "quick": args.quick, "frames": args.frames,
              "repeats": args.repeats,
              "videos": [{**asdict(spec), "label": spec.label} for spec in video_specs(args.quick)]}
    print(f"machine: {report['machine']['name']}", flush=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    def save() -> None:
        report["goals"] = goals(report)
        json_path.write_text(json.dumps(report, indent=1) + "\n")

    for part, bench in (("decode", bench_decode), ("preprocess", bench_preprocess), ("memory", bench_memory),
                        ("serve", bench_serve)):
        if part in args.parts:
            report.setdefault("load_average", {})[part] = os.getloadavg()
            report[part] = bench(args, log)
            save()  # a later part failing keeps the earlier ones
    report["load_average"]["end"] = os.getloadavg()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    save()
    plot(report, png_path)
    print(table(report))
    print(f"wrote {json_path} and {png_path}")
    failed_checks = [g["goal"] for g in report["goals"] if not g["pass"] and
                     ("bit-exact" in g["goal"] or "same indices" in g["goal"])]
    if failed_checks:
        raise SystemExit(f"correctness checks failed: {failed_checks}")
    return report


if __name__ == "__main__":
    main()
