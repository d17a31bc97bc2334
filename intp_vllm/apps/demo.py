"""`intp-vllm demo`: a 64-frame video asked about through vLLM, with an answer you can check.

The model is the needle Video-LLaVA trained here on 8-frame clips (committed under
assets/, or trained on first use). The video is 64 frames of grey noise with a coloured
square flashed in one frame; the demo asks which colour flashed, with INTP reading all 64
frames, and shows what the model would have seen with 8 uniformly sampled frames instead.

Then a motion question, where INTP's grouping decides the answer: a 32-frame video of a
texture sliding fast, asked "How fast did it move?" of the speed model (temporal attention
over its 8-frame window; assets/motion-video-llava-temporal), once with interleaved groups
(the default: each group shows the motion at the stride the encoder was trained on) and once
with consecutive chunks (each shows a quarter of the motion, which looks slow).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEFAULT_DEMO_DIR = Path("runs/demo")
BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "needle-video-llava"
MOTION_MODEL = BUNDLED_MODEL.with_name("motion-video-llava-temporal")
DEMO_FRAMES = 64
MOTION_FRAMES = 32
DEMO_SEED = 7


def needle_model_dir(workdir: Path) -> Path:
    """The committed checkpoint, or one trained into `workdir` on first use."""
    if (BUNDLED_MODEL / "config.json").exists():
        return BUNDLED_MODEL
    trained = workdir / "needle-video-llava"
    if not (trained / "config.json").exists():
        from intp_vllm.research.needle import train_needle

        print(f"training the needle model into {trained} (a few minutes on a CPU) ...")
        train_needle(trained)
    return trained


def demo_clip():
    """A flash that 8-frame sampling misses: the needle sits between two sampled frames."""
    from intp_vllm.research.needle import make_clip
    from intp_vllm.core.rearrange import uniform_frame_indices

    rng = np.random.default_rng(DEMO_SEED)
    sampled = set(uniform_frame_indices(DEMO_FRAMES, 8).tolist())
    while True:
        clip = make_clip(rng, DEMO_FRAMES, "flash")
        if not set(clip.needle_frames) & sampled:
            return clip


def ask_motion(workdir: Path) -> dict:
    """The speed model's answer to a fast 32-frame slide under each grouping."""
    from vllm import LLM, SamplingParams

    from intp_vllm.core.prompt import VIDEO_PROMPT
    from intp_vllm.core.rearrange import GROUPINGS
    from intp_vllm.research.needle import QUESTIONS, make_motion_clip
    from intp_vllm.video.io import read_video, write_video
    from intp_vllm.vllm_ext.engine import shutdown_llm

    rng = np.random.default_rng(DEMO_SEED)
    clip = make_motion_clip(rng, MOTION_FRAMES)
    while clip.answer != "fast":
        clip = make_motion_clip(rng, MOTION_FRAMES)
    video = read_video(write_video(workdir / f"speed-{MOTION_FRAMES}-frames.mkv", clip.frames), MOTION_FRAMES)
    report = {"motion question": f"{QUESTIONS['speed']} ({MOTION_FRAMES} frames; truth: {clip.answer})"}
    for grouping in GROUPINGS:
        llm = LLM(model=str(MOTION_MODEL), dtype="float32", max_num_seqs=1, limit_mm_per_prompt={"video": 1},
                  hf_overrides={"intp": {"frames": MOTION_FRAMES, "grouping": grouping}})
        try:
            (output,) = llm.generate([{"prompt": VIDEO_PROMPT.format(question=QUESTIONS["speed"]),
                                       "multi_modal_data": {"video": video}}],
                                     SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        finally:
            shutdown_llm(llm)
        report[f"answer, {grouping} groups"] = output.outputs[0].text.strip()
    return report


def run_demo(workdir: Path = DEFAULT_DEMO_DIR, frames: int = DEMO_FRAMES) -> dict:
    from vllm import LLM, SamplingParams

    from intp_vllm.research.needle import TASKS
    from intp_vllm.core.rearrange import uniform_frame_indices
    from intp_vllm.core.prompt import VIDEO_PROMPT
    from intp_vllm.video.io import read_video, write_video
    from intp_vllm.vllm_ext.engine import shutdown_llm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = needle_model_dir(workdir)
    clip = demo_clip()
    # lossless: mp4v's lossy coding of grey noise moves pixels by ~8 levels, off what the model was trained on
    video_path = write_video(workdir / f"needle-{DEMO_FRAMES}-frames.mkv", clip.frames)

    started = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", max_num_seqs=4,
              limit_mm_per_prompt={"video": 1}, hf_overrides={"intp": {"frames": frames}})
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    video = read_video(video_path, frames)
    decode_s = time.perf_counter() - started
    sampled = uniform_frame_indices(len(video), 8)

    prompt = VIDEO_PROMPT.format(question=TASKS["flash"])
    params = SamplingParams(temperature=0.0, max_tokens=1)
    started = time.perf_counter()
    full, eight = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": video}},
                                {"prompt": prompt, "multi_modal_data": {"video": video[sampled]}}],
                               params, use_tqdm=False)
    generate_s = time.perf_counter() - started
    video_token = llm.llm_engine.model_config.hf_config.video_token_index
    shutdown_llm(llm)

    report = {
        "model": str(model_dir),
        "video": f"{video_path} ({len(video)} frames decoded)",
        "question": TASKS["flash"],
        "truth": f"{clip.answer} (flashed in frame {clip.needle_frames[0]})",
        "answer, all frames (INTP)": full.outputs[0].text.strip(),
        "video tokens (INTP)": full.prompt_token_ids.count(video_token),
        "8-frame sampling saw frames": sampled.tolist(),
        "answer, 8 sampled frames": f"{eight.outputs[0].text.strip()} (the flash was not in any sampled frame)",
        "load_s": round(load_s, 2),
        "decode_s": round(decode_s, 3),
        "preprocess_prefill_decode_s (both requests)": round(generate_s, 3),
        **ask_motion(workdir),
    }
    print()
    for key, value in report.items():
        print(f"{key:>44}: {value}")
    return report
