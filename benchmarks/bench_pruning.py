"""More frames for fewer tokens: INTP at 128 frames with vLLM's video token pruning, side by side.

One engine (INTP, YaRN at each request's own scale, vLLM's default compiled mode) on the
`bench` "small" checkpoint (768-wide 6-layer Llama, 4-layer CLIP at 112 px, 65 tokens a frame),
every configuration asked per request (`mm_processor_kwargs`), in one run, interleaved over
rounds so that the machine's drift hits them alike (the fastest round is kept). Per
configuration, on the same 128-frame videos (moving shapes on a still background):
- encoder: the model's own `embed_multimodal` (tower + projector on every frame, then the
  retention mask), timed inside the engine's worker;
- 1-token generate per request (preprocessing, encoder, language-model prefill): TTFT-like;
  the language model's prefill is that minus the encoder;
- end-to-end req/s of a batch answering `--new-tokens` tokens each;
- video tokens and KV-cache bytes per request.
Writes JSON and a PNG.

    python benchmarks/bench_pruning.py [--requests 4] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEO_FRAMES = 128
CONFIGS = (
    ("8-frame sampling", 8, 0.0, "evs"),
    ("INTP 32 frames", 32, 0.0, "evs"),
    ("INTP 128 frames", 128, 0.0, "evs"),
    ("128 frames, EVS 0.75", 128, 0.75, "evs"),
    ("128 frames, VidCom2 0.75", 128, 0.75, "vidcom2"),
    ("128 frames, EVS 0.875", 128, 0.875, "evs"),
)
"""(label, frames, pruning rate, pruning method): 128 frames at 0.75 cost the tokens of 32."""


def time_encoder(worker, frames: int, image_size: int, rate: float, method: str, repeats: int) -> float:
    """Median seconds of `embed_multimodal` on one video of `frames` random frames, in the worker."""
    import statistics

    import torch

    from intp_vllm.vllm_ext.model import PRUNING_METHOD_KEY, PRUNING_RATE_KEY
    from intp_vllm.vllm_ext.pruning import VideoPruning

    model = worker.model_runner.model
    pixels = torch.randn(frames, 3, image_size, image_size, generator=torch.Generator().manual_seed(frames))
    kwargs = {"pixel_values_videos": [pixels], PRUNING_RATE_KEY: torch.tensor([rate], dtype=torch.float64),
              PRUNING_METHOD_KEY: torch.tensor([VideoPruning(method, rate).code])}
    times = []
    with torch.inference_mode():
        model.embed_multimodal(**kwargs)
        for _ in range(repeats):
            started = time.perf_counter()
            model.embed_multimodal(**kwargs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def requests(frames: int, rate: float, method: str, count: int, round_index: int) -> list[dict]:
    """`count` questions about new 128-frame videos, read at `frames` frames (uniformly sampled)."""
    from intp_vllm.core.prompt import VIDEO_PROMPT
    from intp_vllm.core.rearrange import uniform_frame_indices
    from intp_vllm.research.synthetic import moving_shapes_video

    batch = []
    for i in range(count):
        video = moving_shapes_video(VIDEO_FRAMES, seed=round_index * 1000 + i)
        batch.append({"prompt": VIDEO_PROMPT.format(question="What is happening in this video?"),
                      "multi_modal_data": {"video": video[uniform_frame_indices(VIDEO_FRAMES, frames)]},
                      "mm_processor_kwargs": {"pruning_rate": rate, "pruning_method": method}})
    return batch


def timed_generate(llm, batch: list[dict], new_tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    started = time.perf_counter()
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                           use_tqdm=False)
    return time.perf_counter() - started, outputs


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [row["config"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].barh(labels, [row["encoder_s"] for row in rows], label="encoder (all frames)")
    axes[0].barh(labels, [row["lm_prefill_s"] for row in rows], left=[row["encoder_s"] for row in rows],
                 label="language-model prefill (+ preprocessing)")
    axes[0].set_xlabel("seconds per request, 1-token generate")
    axes[0].legend(fontsize=7)
    axes[1].barh(labels, [row["req_per_s"] for row in rows])
    axes[1].set_xlabel(f"req/s, {report['new_tokens']} new tokens, batch of {report['requests']}")
    axes[2].barh(labels, [row["kv_mib_per_request"] for row in rows])
    axes[2].set_xlabel("KV cache per request (MiB)")
    for ax in axes[1:]:
        ax.set_yticks(range(len(labels)), [""] * len(labels))
    fig.suptitle(f"INTP with video token pruning, {report['model_name']} ({report['machine']['name']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="requests per configuration and round (one batch)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest is kept")
    parser.add_argument("--new-tokens", type=int, default=16, help="output tokens of the end-to-end batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed encoder calls per configuration")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "bench" / "small-video-llava")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning")
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    from vllm import LLM

    from intp_vllm.apps.bench import SMALL_SPEC
    from intp_vllm.machine import machine
    from intp_vllm.research.tiny_model import make_tiny_model
    from intp_vllm.vllm_ext.cpu_memory import kv_bytes_per_token
    from intp_vllm.vllm_ext.engine import shutdown_llm

    if not (args.model_dir / "config.json").exists():
        make_tiny_model(args.model_dir, SMALL_SPEC)
    llm = LLM(model=str(args.model_dir), dtype="float32", kv_cache_memory_bytes=3 << 30,
              max_num_seqs=args.requests, limit_mm_per_prompt={"video": 1},
              hf_overrides={"intp": {"frames": VIDEO_FRAMES}})
    kv_per_token = kv_bytes_per_token(llm.llm_engine.model_config)
    video_token = llm.llm_engine.model_config.hf_config.video_token_index
    best = {label: {"first_token_s": float("inf"), "batch_s": float("inf")} for label, *_ in CONFIGS}
    for label, frames, rate, method in CONFIGS:  # warm-up of every shape
        timed_generate(llm, requests(frames, rate, method, 1, 0), 1)
    for round_index in range(1, args.rounds + 1):
        for label, frames, rate, method in CONFIGS:
            first, outputs = timed_generate(llm, requests(frames, rate, method, args.requests, round_index), 1)
            batch, _ = timed_generate(llm, requests(frames, rate, method, args.requests, round_index + 100),
                                      args.new_tokens)
            row = best[label]
            row["first_token_s"] = min(row["first_token_s"], first / args.requests)
            row["batch_s"] = min(row["batch_s"], batch)
            row["prompt_tokens"] = len(outputs[0].prompt_token_ids)
            row["video_tokens"] = outputs[0].prompt_token_ids.count(video_token)
            print(f"round {round_index} {label}: {first / args.requests:.3f} s/request to 1 token, "
                  f"{args.requests / batch:.2f} req/s", flush=True)
    rows = []
    for label, frames, rate, method in CONFIGS:
        [encoder_s] = llm.collective_rpc(time_encoder, args=(frames + (-frames % 8), SMALL_SPEC.image_size, rate,
                                                             method, args.repeats))
        row = best[label]
        rows.append({"config": label, "frames": frames, "pruning_rate": rate, "pruning_method": method,
                     "video_tokens": row["video_tokens"], "prompt_tokens": row["prompt_tokens"],
                     "kv_mib_per_request": round(row["prompt_tokens"] * kv_per_token / 2**20, 2),
                     "first_token_s": round(row["first_token_s"], 4), "encoder_s": round(encoder_s, 4),
                     "lm_prefill_s": round(max(row["first_token_s"] - encoder_s, 0.0), 4),
                     "encoder_share": round(encoder_s / row["first_token_s"], 3),
                     "req_per_s": round(args.requests / row["batch_s"], 3)})
    shutdown_llm(llm)
    unpruned = next(r for r in rows if r["config"] == "INTP 128 frames")
    for row in rows:
        row["lm_prefill_speedup_vs_128f"] = round(unpruned["lm_prefill_s"] / max(row["lm_prefill_s"], 1e-9), 2)
        row["req_per_s_vs_128f"] = round(row["req_per_s"] / unpruned["req_per_s"], 2)
    report = {"benchmark": "pruning", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "model": str(args.model_dir), "model_name": args.model_dir.name,
              "requests": args.requests, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "kv_bytes_per_token": kv_per_token, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pruning.json").write_text(json.dumps(report, indent=1))
    for row in rows:
        print(row)
    print(f"wrote {plot(report, args.out / 'bench_pruning.png')} and bench_pruning.json")
    return report


if __name__ == "__main__":
    main()
