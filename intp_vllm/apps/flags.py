"""Command-line flags shared by `intp-vllm serve`, `batch`, `bench` and `eval-needle`."""

from __future__ import annotations

import argparse

from intp_vllm.video.io import DECODERS


def parse_factor(text: str) -> float | str:
    """--factor: a number, or "auto". Raises argparse.ArgumentTypeError otherwise."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--factor must be a number >= 1 or "auto", got {text!r}') from None


def parse_preprocess_device(text: str) -> str:
    """--preprocess-device: "pillow", "cpu", "cuda" or "cuda:N" on a host that has it
    (`core.checks.check_preprocess_device`). Raises argparse.ArgumentTypeError otherwise, so a bad
    value is one line at start, not a traceback from vLLM's config."""
    from intp_vllm.core.checks import check_preprocess_device

    try:
        check_preprocess_device("--preprocess-device", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_intp_arguments(parser: argparse.ArgumentParser) -> None:
    """The INTP flags shared by serve, batch and bench; unset ones keep the checkpoint's defaults."""
    from intp_vllm.core.config import GROUPINGS, ROPE_TYPES

    group = parser.add_argument_group("INTP (training-free long video)")
    group.add_argument("--frames", type=int,
                       help="frames sampled per video (default: the checkpoint's intp.frames where it sets one, "
                       "else Video-LLaVA's encoder window, 8, or LLaVA-NeXT-Video's 32)")
    group.add_argument("--max-frames", type=int,
                       help="most frames one request may carry, the one knob of long videos: a batch job's "
                       "\"frames\", a server request's mm_processor_kwargs={'frames': n} (the server also needs vLLM's "
                       "--trust-request-mm-kwargs), and the cap of sampling by rate (--fps, a request's 'fps'); the "
                       "decoder's frame cap, max_model_len and the fetch-and-decode deadline follow it "
                       "(default: --frames)")
    group.add_argument("--fps", type=float,
                       help="sample videos by rate: frames a second of video (600 for 10 minutes at 1 fps), capped "
                       "by --max-frames; a request may still name its own 'frames' or 'fps' (default: --frames "
                       "frames over the whole video)")
    group.add_argument("--encoder-frames", type=int, help="the encoder's trained window N (default: from checkpoint)")
    group.add_argument("--rope-type", choices=ROPE_TYPES,
                       help="RoPE context extension (default yarn; ntk is the INTP paper's)")
    group.add_argument("--factor", type=parse_factor,
                       help='RoPE scale s >= 1, or "auto" (default): each request gets max(1, prompt tokens / '
                       "trained context), so short requests run the original model")
    group.add_argument("--grouping", choices=GROUPINGS, help="how frames are split into encoder clips "
                       "(default interleaved)")
    group.add_argument("--preprocess-device", type=parse_preprocess_device, metavar="{pillow,cpu,cuda,cuda:N}",
                       help="where frames are resized and cropped: pillow (default) is bit-exact with HF's "
                       "processor; a torch device (cuda, cuda:N, or cpu) is opt-in, within about one uint8 level of "
                       "it; on a GPU the serving process then opens a CUDA context (~0.5 GB) on that device")


def intp_section(args: argparse.Namespace) -> dict:
    """The `intp` hf_overrides section from the parsed flags (only those given)."""
    keys = {"frames": "frames", "max_frames": "max_frames", "fps": "fps", "encoder_frames": "encoder_frames",
            "rope_type": "rope_type", "factor": "factor", "grouping": "grouping",
            "preprocess_device": "preprocess_device"}
    return {key: getattr(args, attr) for attr, key in keys.items() if getattr(args, attr, None) is not None}


def with_long_context(hf_overrides: dict, max_model_len: int | None) -> dict:
    """`hf_overrides` that let an explicit `max_model_len` exceed the checkpoint's trained length
    when INTP extends RoPE (its `intp` rope_type is not "none"): `text_config.model_max_length`
    set to it, the one length vLLM accepts past `max_position_embeddings` without
    VLLM_ALLOW_LONG_MAX_MODEL_LEN. The plugin then checks it against intp.max_frames at start
    (plugin.py). `hf_overrides` as it is when no length is given (it then follows --max-frames)."""
    intp = hf_overrides.get("intp") or {}
    if not max_model_len or max_model_len < 0 or intp.get("rope_type") == "none":
        return hf_overrides
    text = hf_overrides.get("text_config") or {}
    return {**hf_overrides, "text_config": {"model_max_length": max_model_len, **text}}


def cidr_list(text: str) -> list[str]:
    """--allowed-media-networks: comma-separated CIDRs (checked by `fetch.HostPolicy`)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_media_host_arguments(parser) -> None:
    """Which hosts http(s) videos may come from (fetch.py), shared by serve and batch; `parser`
    may be an argument group."""
    parser.add_argument("--allow-private-media-hosts", action="store_true",
                        help="fetch http(s) videos from any address, loopback and private networks included; by "
                        "default only public addresses are fetched (a video URL could otherwise read this host's "
                        "own network: cloud metadata, admin ports). For closed deployments")
    parser.add_argument("--allowed-media-networks", type=cidr_list, default=[], metavar="CIDR[,CIDR...]",
                        help="networks fetched although not public, comma-separated, e.g. 10.20.0.0/16,fd00::/8 "
                        "(narrower than --allow-private-media-hosts)")


def add_video_decoder_argument(parser) -> None:
    """--video-decoder, shared by serve and batch; `parser` may be an argument group."""
    parser.add_argument("--video-decoder", choices=sorted(DECODERS), default="pyav",
                        help="how videos are decoded: " + "; ".join(f"{k}: {v}" for k, v in DECODERS.items()))
