"""The benchmark's runs and what runs them: HF transformers `generate`, and vLLM with the plugin.
Each runner is called as `fn(report, **kwargs)` in its own process (`harness.run_isolated`)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from intp_vllm.apps.bench.workload import Request, make_video
from intp_vllm.core.config import IntpConfig
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.vllm_ext.engine import shutdown_llm
from intp_vllm.vllm_ext.plugin import config_model_class
from intp_vllm.vllm_ext.pruning import VideoPruning

BASELINE_FRAMES = 8
"""Frames of the HF and plugin baselines (Video-LLaVA's window; LLaVA-NeXT-Video is read at 8 too)."""


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    engine: str  # "hf" or "vllm"
    frames: int  # frames a video is read at (sampled uniformly when it has more)
    intp: dict | None = None  # the engine's `intp` section (replaces the checkpoint's); None: the checkpoint's
    pruning: VideoPruning | None = None  # vLLM's video token pruning of the engine; None = none
    role: str = ""  # what the goals compare it as: "hf", "plugin", "intp", "unscaled" or "pruned"


def make_runs(intp_frames: tuple[int, ...], pruning: VideoPruning | None = None) -> list[Run]:
    """HF generate and the plugin at 8 frames, then for each F of `intp_frames` INTP and its
    unscaled twin; with `pruning` (rate > 0) INTP at the largest F with that pruning,
    `intp_<F>f_<method><rate>`."""
    runs = [
        Run("hf_generate", "HF generate, 8 frames", "hf", BASELINE_FRAMES, role="hf"),
        Run("plugin_8f", "plugin, 8 frames", "vllm", BASELINE_FRAMES, {"frames": BASELINE_FRAMES}, role="plugin"),
    ]
    for frames in intp_frames:
        runs += [
            Run(f"intp_{frames}f", f"INTP (YaRN), {frames} frames", "vllm", frames, yarn(frames), role="intp"),
            Run(f"unscaled_{frames}f", f"{frames} frames, no RoPE scaling", "vllm", frames,
                {"frames": frames, "rope_type": "none", "factor": 1, "grouping": "consecutive"}, role="unscaled"),
        ]
    if pruning is not None and pruning.rate > 0:
        frames = max(intp_frames)
        runs.append(Run(f"intp_{frames}f_{pruning.method}{pruning.rate:g}",
                        f"INTP (YaRN), {frames} frames, {pruning.method} {pruning.rate:g}", "vllm", frames,
                        yarn(frames), pruning, role="pruned"))
    return runs


def yarn(frames: int) -> dict:
    """INTP's `intp` section: `frames` frames, YaRN at each request's own scale."""
    return {"frames": frames, "rope_type": "yarn", "factor": "auto"}


def select_runs(runs: list[Run], names: list[str] | None) -> list[Run]:
    unknown = sorted(set(names or ()) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; choose from {[r.name for r in runs]}")
    return [r for r in runs if names is None or r.name in names]


def engine_intp(hf_config, intp: dict | None) -> IntpConfig:
    """The `IntpConfig` of an engine given `intp` (vLLM's hf_overrides replaces the checkpoint's
    section with it; None keeps the checkpoint's), the model adapter's defaults for the rest."""
    if intp is not None:
        hf_config = copy.copy(hf_config)
        hf_config.intp = intp
    return config_model_class(hf_config).intp_config(hf_config)


def run_hf(report, model_dir: str, rounds: list[list[Request]], frames: int, device: str, dtype: str) -> None:
    """HF transformers as an HF user runs it: the checkpoint's class (`VideoLlavaForConditionalGeneration`,
    `LlavaNextVideoForConditionalGeneration`), CLIPImageProcessor (PIL; no torchvision here) at the
    size the plugin preprocesses at, so both get the same pixel values, the tokenizer, `generate`
    greedy, one request at a time. Frames are chosen as the plugin chooses them (uniform, padded
    to whole encoder clips). EOS is off so every request decodes exactly its max_tokens, as vLLM
    does with ignore_eos."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from intp_vllm.research.hf_video_llava import hf_model_class
    from intp_vllm.vllm_ext.model import select_frames

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each new token: the second put is the first token."""

        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self):
            pass

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    model = hf_model_class(config).from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    adapter = config_model_class(config)
    preprocess = adapter.preprocess_config(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": preprocess.shortest_edge},
                                      crop_size={"height": preprocess.crop_size, "width": preprocess.crop_size},
                                      image_mean=list(preprocess.mean), image_std=list(preprocess.std))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    video_id = config.video_token_index
    per_frame = adapter.tokens_per_frame(config)
    encoder_frames = engine_intp(config, None).encoder_frames
    startup = time.perf_counter() - start

    results = []
    for requests in rounds:
        videos = [make_video(r) for r in requests]
        records = []
        round_start = time.perf_counter()
        for request, video in zip(requests, videos):
            begin = time.perf_counter()
            chosen = video[select_frames(len(video), frames, encoder_frames)]
            pixels = processor(images=list(chosen), return_tensors="pt")["pixel_values"][None]
            ids = []
            for token in tokenizer(VIDEO_PROMPT.format(question=request.question))["input_ids"]:
                ids += [video_id] * (len(chosen) * per_frame) if token == video_id else [token]
            streamer = FirstToken()
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids], device=device),
                                     pixel_values_videos=pixels.to(device, model.dtype),
                                     max_new_tokens=request.max_tokens, do_sample=False, streamer=streamer)
            records.append({"frames": len(chosen), "prompt_tokens": len(ids), "output_tokens": out.shape[1] - len(ids),
                            "video_tokens": ids.count(video_id), "ttft_s": streamer.at - begin})
        results.append({"seconds": time.perf_counter() - round_start, "requests": records})
    report({"startup_s": startup, "rounds": results})


def run_vllm(report, model_dir: str, rounds: list[list[Request]], frames: int, intp: dict | None,
             pruning: VideoPruning | None, engine: dict) -> None:
    """All of a round's requests in one `LLM.generate` (vLLM batches them); TTFT is vLLM's own
    per-request first-token latency, from the request's arrival at the engine. `frames`: what
    the processor reads a video at (`intp.frames`); `pruning` the engine's video token pruning;
    `engine` vLLM's arguments, `max_model_len` the run's longest request (sizing.py)."""
    import os

    # INTP's RoPE extension is what makes positions past the checkpoint's context valid, so a
    # run's max_model_len may exceed it (vLLM refuses that unless told; the plugin's own
    # sizing raises it when none is given).
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from vllm import LLM, SamplingParams

    from intp_vllm.vllm_ext.model import select_frames

    if pruning is not None:
        engine = {**engine, "video_pruning_rate": pruning.rate, "video_pruning_method": pruning.method}
    start = time.perf_counter()
    llm = LLM(model=model_dir, hf_overrides={"intp": intp} if intp else None, disable_log_stats=False, **engine)
    startup = time.perf_counter() - start
    hf_config = llm.llm_engine.model_config.hf_config
    video_id, encoder_frames = hf_config.video_token_index, engine_intp(hf_config, None).encoder_frames
    results = []
    for requests in rounds:
        prompts = [{"prompt": VIDEO_PROMPT.format(question=r.question), "multi_modal_data": {"video": make_video(r)}}
                   for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        round_start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - round_start
        results.append({"seconds": seconds, "requests": [
            {"frames": len(select_frames(r.frames, frames, encoder_frames)), "prompt_tokens": len(o.prompt_token_ids),
             "output_tokens": len(o.outputs[0].token_ids), "video_tokens": o.prompt_token_ids.count(video_id),
             "ttft_s": o.metrics.first_token_latency}
            for r, o in zip(requests, outputs)]})
    # The result goes to the parent before the engine's seconds-long shutdown, which then
    # overlaps the next run's process start-up.
    report({"startup_s": startup, "rounds": results})
    shutdown_llm(llm)
