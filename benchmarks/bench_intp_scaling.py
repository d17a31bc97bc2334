"""INTP's cost against the frame count F: encoder time and prefill time for F = 8 ... 128.

One engine (INTP, YaRN at each request's own scale, vLLM's default compiled mode) on the
`bench` "small" checkpoint (768-wide 6-layer Llama, 4-layer CLIP at 112 px). Per F:
- encoder: the model's own `embed_video` (K = F / 8 interleaved groups through the frozen
  tower and projector, tokens back in time order), timed inside the engine's worker;
- prefill: `LLM.generate` with one new token for a batch of requests of F frames each
  (preprocessing, encoder and LM prefill), per request.
The same visual-token count with and without INTP's machinery is compared by
`intp-vllm bench` (runs `intp_32f` / `unscaled_32f`). Writes JSON and a PNG.

    python benchmarks/bench_intp_scaling.py [--frames 8 16 32 64 128] [--requests 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_encoder(worker, frames: int, image_size: int, repeats: int) -> float:
    """Median seconds of embed_video over `frames` random frames, in the worker process."""
    import statistics

    import torch

    model = worker.model_runner.model
    pixels = torch.randn(frames, 3, image_size, image_size, generator=torch.Generator().manual_seed(frames))
    times = []
    with torch.inference_mode():
        model.embed_video(pixels)
        for _ in range(repeats):
            started = time.perf_counter()
            model.embed_video(pixels)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_prefill(llm, frames: int, requests: int) -> tuple[float, int]:
    """Seconds per request of a one-token generate over `requests` videos of `frames` frames; prompt tokens."""
    from vllm import SamplingParams

    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.core.prompt import VIDEO_PROMPT

    batch = [{"prompt": VIDEO_PROMPT.format(question="What is happening in this video?"),
              "multi_modal_data": {"video": moving_shapes_video(frames, seed=seed)}} for seed in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=1)
    started = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    return (time.perf_counter() - started) / requests, len(outputs[0].prompt_token_ids)


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [row["frames"] for row in report["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frames, [row["encoder_s"] for row in report["rows"]], "o-", label="encoder (embed_video)")
    ax.plot(frames, [row["prefill_s_per_request"] for row in report["rows"]], "s-",
            label="generate 1 token (preprocess + encoder + prefill)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.set_xlabel("frames F (K = F / 8 encoder groups)")
    ax.set_ylabel("seconds per request")
    ax.set_title(f"INTP cost vs frames\n{report['machine']['name']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--requests", type=int, default=4, help="requests per frame count (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed encoder calls per frame count")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "bench" / "small-video-llava")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intp_scaling")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    from vllm import LLM

    from intp_vllm.research.tiny_model import make_tiny_model
    from intp_vllm.apps.bench import SMALL_SPEC
    from intp_vllm.machine import machine
    from intp_vllm.vllm_ext.engine import shutdown_llm

    if not (args.model_dir / "config.json").exists():
        make_tiny_model(args.model_dir, SMALL_SPEC)
    llm = LLM(model=str(args.model_dir), dtype="float32", kv_cache_memory_bytes=2 << 30,
              max_num_seqs=args.requests, limit_mm_per_prompt={"video": 1},
              hf_overrides={"intp": {"frames": max(args.frames)}})
    rows = []
    for frames in args.frames:
        time_prefill(llm, frames, 1)  # warm-up of this shape
        [encoder_s] = llm.collective_rpc(time_encoder, args=(frames, SMALL_SPEC.image_size, args.repeats))
        prefill_s, prompt_tokens = time_prefill(llm, frames, args.requests)
        rows.append({"frames": frames, "groups": frames // 8, "prompt_tokens": prompt_tokens,
                     "encoder_s": round(encoder_s, 4), "prefill_s_per_request": round(prefill_s, 4),
                     "encoder_share": round(encoder_s / prefill_s, 3)})
        print(rows[-1], flush=True)
    shutdown_llm(llm)
    report = {"benchmark": "intp_scaling", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "model": str(args.model_dir), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intp_scaling.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {plot(report, args.out / 'intp_scaling.png')} and intp_scaling.json")
    return report


if __name__ == "__main__":
    main()
