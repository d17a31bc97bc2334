"""The benchmark's settings, and `benchmark`: every selected run on the same rounds of requests,
between two measurements of the matmul peak, summarized into one report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from intp_vllm.apps.bench.flops import ModelShape, accelerator, matmul_peak
from intp_vllm.apps.bench.harness import run_isolated, stop
from intp_vllm.apps.bench.report import goals, summarize_run
from intp_vllm.apps.bench.runners import make_runs, run_hf, run_vllm, select_runs
from intp_vllm.apps.bench.sizing import available_memory, engine_sizes
from intp_vllm.apps.bench.workload import Request, make_workload
from intp_vllm.core.config import kv_bytes_per_token
from intp_vllm.machine import machine
from intp_vllm.vllm_ext.cpu_memory import weight_bytes
from intp_vllm.vllm_ext.plugin import config_model_class
from intp_vllm.vllm_ext.pruning import VideoPruning


@dataclass(frozen=True)
class Settings:
    requests: int = 16
    frames: tuple[int, ...] = (8, 16, 32)
    new_tokens: tuple[int, ...] = (8, 32, 64)
    intp_frames: tuple[int, ...] | None = None  # None: the largest of `frames`
    repeats: int = 3
    enforce_eager: bool = False
    kv_cache_gib: float | None = None  # None: each run's from the checkpoint and its longest request (sizing.py)
    peak_seconds: float = 3.0  # matmul peak measurement, before and after the runs
    pruning_rate: float = 0.0  # > 0: a fifth run, INTP with vLLM's video token pruning at this rate
    pruning_method: str = "evs"


QUICK_SETTINGS = Settings(requests=4, frames=(8, 16), new_tokens=(4, 8), repeats=1, enforce_eager=True,
                          peak_seconds=1.0)


def intp_frame_counts(settings: Settings) -> tuple[int, ...]:
    """The F of the INTP and unscaled runs: `settings.intp_frames`, else the largest video."""
    return settings.intp_frames or (max(settings.frames),)


def make_rounds(settings: Settings) -> list[list[Request]]:
    """The warm-up round (one short request per frame count: first-call costs such as the
    allocator, oneDNN and new shapes), then `repeats` timed rounds of `requests` requests."""
    rounds = [make_workload(len(settings.frames), settings.frames, settings.new_tokens[:1], 0)]
    return rounds + [make_workload(settings.requests, settings.frames, settings.new_tokens, i)
                     for i in range(1, settings.repeats + 1)]


def benchmark(model_dir: str, settings: Settings, run_names: list[str] | None = None, log=print) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    intp_frames = intp_frame_counts(settings)
    runs = make_runs(intp_frames, VideoPruning(settings.pruning_method, settings.pruning_rate))
    selected = select_runs(runs, run_names)
    device, dtype = accelerator()
    hf_config = AutoConfig.from_pretrained(model_dir)
    shape = ModelShape.from_hf_config(hf_config)
    model_type = config_model_class(hf_config).model_name
    log(f"{model_type}: {shape.tokens_per_frame} tokens a frame")
    kv_per_token = kv_bytes_per_token(hf_config.text_config, getattr(torch, dtype).itemsize)
    rounds = make_rounds(settings)
    engine = dict(dtype=dtype, enforce_eager=settings.enforce_eager, max_num_seqs=settings.requests,
                  limit_mm_per_prompt={"video": 1}, seed=0)
    info = machine()
    log(f"machine: {info['name']}; measuring the {dtype} matmul peak")
    peaks = [matmul_peak(device, dtype, seconds=settings.peak_seconds)]
    sizes = engine_sizes(selected, [r for requests in rounds for r in requests], settings.requests, hf_config,
                         AutoTokenizer.from_pretrained(model_dir), getattr(torch, dtype).itemsize,
                         available_memory(device), weight_bytes(model_dir), settings.kv_cache_gib)
    for name, size in sizes.items():
        log(f"{name}: max_model_len {size.max_model_len}, KV cache {size.kv_cache_memory_bytes / 2**20:.0f} MiB "
            f"({size.request_kv_bytes / 2**20:.1f} MiB a request at max_model_len)")
    results, exiting = {}, []
    try:
        for run in selected:
            log(f"{run.name}: {run.label} ...")
            if run.engine == "hf":
                result, process = run_isolated(run_hf, model_dir=model_dir, rounds=rounds, frames=run.frames,
                                               device=device, dtype=dtype)
            else:
                size = sizes[run.name]
                result, process = run_isolated(
                    run_vllm, model_dir=model_dir, rounds=rounds, frames=run.frames, intp=run.intp,
                    pruning=run.pruning, engine={**engine, "max_model_len": size.max_model_len,
                                                 "kv_cache_memory_bytes": size.kv_cache_memory_bytes})
            results[run.name] = result
            if device == "cuda":
                stop(process)  # its GPU memory must be free before the next engine sizes its KV cache
            else:
                exiting.append(process)
            log(f"{run.name}: rounds {[round(r['seconds'], 2) for r in result['rounds']]} s (first is warm-up)")
    finally:
        for process in exiting:
            stop(process)
    peaks.append(matmul_peak(device, dtype, seconds=settings.peak_seconds))
    peak = max(peaks)
    summaries = {run.name: summarize_run(run, results[run.name], shape, peak, kv_per_token) for run in selected}
    report = {
        "machine": info,
        "device": device,
        "dtype": dtype,
        "peak_flops": peak,
        "peak_flops_measured": peaks,
        "model": str(model_dir),
        "model_name": Path(model_dir).name,
        "model_type": model_type,
        "model_shape": asdict(shape),
        "kv_bytes_per_token": kv_per_token,
        "engine_sizes": {name: asdict(size) for name, size in sizes.items()},
        "settings": {**asdict(settings), "intp_frames": list(intp_frames)},
        "workload": [asdict(r) for r in rounds[1]],
        "runs": summaries,
    }
    if len(selected) == len(runs):
        report["goals"] = goals(summaries, runs)
    return report
