"""Offline throughput of Video-LLaVA: HF transformers against the plugin, 8 frames against INTP.

Four runs answer the same questions about the same videos, each in a fresh process:

- `hf_generate`   HF transformers `generate`, one request at a time, 8 frames (Video-LLaVA's own way)
- `plugin_8f`     vLLM with the plugin as shipped: the encoder window, 8 frames sampled per video
- `intp_<F>f`     INTP at F = K x 8 frames: interleaved groups, YaRN at each request's own scale
- `unscaled_<F>f` F frames, no RoPE scaling and no per-request scale (`rope_type "none"`, factor 1,
                  consecutive groups): the same visual tokens without INTP's machinery, so
                  intp / unscaled - 1 is INTP's own overhead

Each run reports req/s, video frames/s (frames through the encoder), prompt and output tokens/s,
TTFT and peak memory of its process tree, and the model FLOPs it did, counted analytically
(vision tower, projector, LM prefill with attention, decode). The machine's dense matmul peak is
measured in the same run (fp32 on CPU, bf16 on GPU), so each run also gets an MFU and every rate
its ceiling at 100% MFU. vLLM runs in its default compiled mode unless --enforce-eager.

    intp-vllm bench                          # 16 requests on a generated "small" checkpoint -> runs/bench/
    intp-vllm bench --quick                  # seconds-scale smoke run on a tiny checkpoint (eager; not for numbers)
    python -m intp_vllm.apps.bench --model /models/Video-LLaVA-7B-hf --intp-frames 32
"""

from intp_vllm.apps.bench.cli import add_bench_arguments, main_bench
from intp_vllm.apps.bench.flops import ModelShape, decoder_flops, request_flops
from intp_vllm.apps.bench.workload import SMALL_SPEC, make_workload

__all__ = ["SMALL_SPEC", "ModelShape", "add_bench_arguments", "decoder_flops", "main_bench", "make_workload",
           "request_flops"]
