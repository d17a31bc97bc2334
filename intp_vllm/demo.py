"""`intp-vllm demo`: one question about a synthetic video, answered through vLLM with the plugin."""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_DEMO_DIR = Path("runs/demo")
QUESTION = "What is happening in this video?"


def run_demo(workdir: Path = DEFAULT_DEMO_DIR, frames: int = 8, max_tokens: int = 24) -> dict:
    """Build the tiny checkpoint if absent, write a video, ask one question; return what was printed."""
    from vllm import LLM, SamplingParams

    from .tiny_model import make_tiny_model
    from .synthetic import moving_shapes_video
    from .video_io import read_video, write_video

    workdir = Path(workdir)
    model_dir = workdir / "tiny-video-llava"
    if not (model_dir / "config.json").exists():
        print(f"building tiny random-weight checkpoint in {model_dir} ...")
        make_tiny_model(model_dir)
    video_path = write_video(workdir / "moving-shapes.mp4", moving_shapes_video(num_frames=48))

    started = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        kv_cache_memory_bytes=256 << 20,
        max_num_seqs=4,
        limit_mm_per_prompt={"video": 1},
        hf_overrides={"intp": {"frames": frames}},
    )
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    video = read_video(video_path, frames)
    decode_s = time.perf_counter() - started

    prompt = f"USER: <video>\n{QUESTION} ASSISTANT:"
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    started = time.perf_counter()
    output = llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, params, use_tqdm=False)[0]
    generate_s = time.perf_counter() - started

    metrics = output.metrics
    video_token_id = llm.llm_engine.model_config.hf_config.video_token_index
    report = {
        "video": str(video_path),
        "frames": int(video.shape[0]),
        "video_tokens": sum(1 for t in output.prompt_token_ids if t == video_token_id),
        "prompt_tokens": len(output.prompt_token_ids),
        "question": QUESTION,
        "answer": output.outputs[0].text,
        "new_tokens": len(output.outputs[0].token_ids),
        "load_s": round(load_s, 2),
        "decode_s": round(decode_s, 3),
        "preprocess_prefill_decode_s": round(generate_s, 3),
    }
    if metrics is not None and getattr(metrics, "first_token_latency", None):
        report["first_token_s"] = round(metrics.first_token_latency, 3)
    print()
    for key, value in report.items():
        print(f"{key:>28}: {value}")
    print("\n(the tiny checkpoint has random weights: the answer is noise, the pipeline is real)")
    return report
