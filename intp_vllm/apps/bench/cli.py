"""`intp-vllm bench`: its arguments, and the run that generates a checkpoint when none is given,
prints the table and goals, and writes the report."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from intp_vllm.apps.bench.benchmark import QUICK_SETTINGS, Settings, benchmark, intp_frame_counts
from intp_vllm.apps.bench.report import table, write_report
from intp_vllm.apps.bench.runners import make_runs, select_runs
from intp_vllm.apps.bench.workload import (
    ARCHITECTURES,
    GENERATED_ROPE_LINEAR,
    generate_checkpoint,
    generated_spec,
)
from intp_vllm.vllm_ext.plugin import config_model_class
from intp_vllm.vllm_ext.pruning import PRUNING_METHODS, VideoPruning


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--model", help="an HF-format Video-LLaVA or LLaVA-NeXT-Video checkpoint directory, its "
                        "model from its config (default: generate one of --architecture, the small 768-wide "
                        "6-layer Llama + 4-layer CLIP at 112 px, random weights)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=ARCHITECTURES[0],
                        help="the model of the generated checkpoint when --model is not given (default "
                        f"{ARCHITECTURES[0]}; llava-next-video: 2x2 pooling, 16 tokens a frame, linear RoPE x2 "
                        "in its config, trained context holding 32 frames)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the tiny test checkpoint, {QUICK_SETTINGS.requests} requests, eager "
                        "engines, one timed round (checks the pipeline; its numbers are not throughput numbers)")
    parser.add_argument("--requests", type=int, help=f"requests per round (default {defaults.requests})")
    parser.add_argument("--frames", help="comma-separated frame counts of the videos, cycled over the requests "
                        f"(default {','.join(map(str, defaults.frames))})")
    parser.add_argument("--new-tokens", help="comma-separated output lengths, cycled over the requests "
                        f"(default {','.join(map(str, defaults.new_tokens))})")
    parser.add_argument("--intp-frames", help="comma-separated frame counts F of the INTP and unscaled runs, "
                        "a pair of runs for each (Video-LLaVA: F = K x 8; default: the largest of --frames)")
    parser.add_argument("--repeats", type=int, help=f"timed rounds after the warm-up round; the fastest is "
                        f"reported (default {defaults.repeats})")
    parser.add_argument("--pruning-rate", type=float,
                        help="add a fifth run, intp_<F>f_<method><rate>: INTP with vLLM's video token pruning at "
                        "this rate, in [0, 1) (default 0: no such run)")
    parser.add_argument("--pruning-method", choices=PRUNING_METHODS,
                        help=f"the fifth run's pruning method (default {defaults.pruning_method})")
    parser.add_argument("--runs", help="comma-separated subset of hf_generate,plugin_8f,intp_<F>f,unscaled_<F>f "
                        "and the pruned run (at the largest F) (default all; the goals need all of them)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="vLLM without torch.compile (faster start, slower run)")
    parser.add_argument("--kv-cache-gib", type=float,
                        help="KV cache per engine (default: each run's from the checkpoint's KV bytes a token x its "
                        "longest request x --requests, capped at half the device memory left after the weights)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench"),
                        help="where throughput.json and throughput.png go (default runs/bench)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"expected positive integers, got {text!r}")
    return values


def settings_from(args) -> Settings:
    base = QUICK_SETTINGS if args.quick else Settings()
    given = {
        "requests": args.requests,
        "frames": _int_list(args.frames) if args.frames else None,
        "new_tokens": _int_list(args.new_tokens) if args.new_tokens else None,
        "intp_frames": _int_list(args.intp_frames) if args.intp_frames else None,
        "repeats": args.repeats,
        "enforce_eager": args.enforce_eager,
        "kv_cache_gib": args.kv_cache_gib,
        "pruning_rate": args.pruning_rate,
        "pruning_method": args.pruning_method,
    }
    settings = replace(base, **{k: v for k, v in given.items() if v is not None})
    if settings.requests < 1 or settings.repeats < 1:
        raise SystemExit("--requests and --repeats must be at least 1")
    if settings.kv_cache_gib is not None and not settings.kv_cache_gib > 0:
        raise SystemExit(f"--kv-cache-gib must be positive, got {settings.kv_cache_gib}")
    try:
        VideoPruning(settings.pruning_method, settings.pruning_rate)
    except ValueError as error:
        raise SystemExit(f"--pruning-rate/--pruning-method: {error}") from None
    return settings


def main_bench(args) -> dict:
    settings = settings_from(args)
    run_names = args.runs.split(",") if args.runs else None
    try:
        select_runs(make_runs(intp_frame_counts(settings), VideoPruning(settings.pruning_method,
                                                                        settings.pruning_rate)), run_names)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.model:
        from transformers import AutoConfig

        try:
            config_model_class(AutoConfig.from_pretrained(args.model))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--model {args.model}: {error}") from None
    kind = "tiny" if args.quick else "small"
    with tempfile.TemporaryDirectory(prefix="intp-bench-") as tmp:
        if args.model:
            model_dir = args.model
        else:
            model_dir = str(generate_checkpoint(args.architecture, args.quick, Path(tmp) / kind))
        report = benchmark(model_dir, settings, run_names)
    if not args.model:
        spec = asdict(generated_spec(args.architecture, args.quick))
        if args.architecture == "llava-next-video":
            spec["rope_linear"] = GENERATED_ROPE_LINEAR
        report.update(model=f"generated {kind} {args.architecture} checkpoint (model_spec)",
                      model_name=f"{kind} {args.architecture} (random weights)", model_spec=spec)
    print(table(report))
    for name, goal in report.get("goals", {}).items():
        print(f"{name}: {goal['value']:.3f} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
    for path in write_report(report, args.output_dir):
        print(f"wrote {path}")
    return report
