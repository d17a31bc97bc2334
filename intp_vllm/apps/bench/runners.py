"""The benchmark's runs and what runs them: HF transformers `generate`, and vLLM with the plugin.
Each runner is called as `fn(report, **kwargs)` in its own process (`harness.run_isolated`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from intp_vllm.apps.bench.flops import ModelShape
from intp_vllm.apps.bench.workload import Request, make_video
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.vllm_ext.engine import shutdown_llm
from intp_vllm.vllm_ext.pruning import VideoPruning


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    engine: str  # "hf" or "vllm"
    frames: int  # frames a video is read at (sampled uniformly when it has more)
    intp: dict | None = None  # the checkpoint's `intp` section; None = the plugin's defaults
    pruning: VideoPruning | None = None  # vLLM's video token pruning of the engine; None = none


def make_runs(intp_frames: int, pruning: VideoPruning | None = None) -> list[Run]:
    """The four runs the goals compare, and with `pruning` (rate > 0) INTP with that pruning,
    `intp_<F>f_<method><rate>`."""
    intp = {"frames": intp_frames, "rope_type": "yarn", "factor": "auto"}
    runs = [
        Run("hf_generate", "HF generate, 8 frames", "hf", 8),
        Run("plugin_8f", "plugin, 8 frames", "vllm", 8),
        Run(f"intp_{intp_frames}f", f"INTP (YaRN), {intp_frames} frames", "vllm", intp_frames, intp),
        Run(f"unscaled_{intp_frames}f", f"{intp_frames} frames, no RoPE scaling", "vllm", intp_frames,
            {"frames": intp_frames, "rope_type": "none", "factor": 1, "grouping": "consecutive"}),
    ]
    if pruning is not None and pruning.rate > 0:
        runs.append(Run(f"intp_{intp_frames}f_{pruning.method}{pruning.rate:g}",
                        f"INTP (YaRN), {intp_frames} frames, {pruning.method} {pruning.rate:g}", "vllm", intp_frames,
                        intp, pruning))
    return runs


def select_runs(runs: list[Run], names: list[str] | None) -> list[Run]:
    unknown = sorted(set(names or ()) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; choose from {[r.name for r in runs]}")
    return [r for r in runs if names is None or r.name in names]


def run_hf(report, model_dir: str, rounds: list[list[Request]], frames: int, device: str, dtype: str) -> None:
    """HF transformers as an HF user runs it: CLIPImageProcessor (PIL; no torchvision here), the
    tokenizer, `generate` greedy, one request at a time. Frames are chosen as the plugin chooses
    them (uniform, padded to whole 8-frame clips). EOS is off so every request decodes exactly its
    max_tokens, as vLLM does with ignore_eos."""
    import torch
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from intp_vllm.core.config import default_encoder_frames
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
    model = VideoLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    video_id = model.config.video_token_index
    per_frame = ModelShape.from_hf_config(model.config).tokens_per_frame
    encoder_frames = default_encoder_frames(model.config)
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

    from intp_vllm.core.config import default_encoder_frames
    from intp_vllm.vllm_ext.model import select_frames

    if pruning is not None:
        engine = {**engine, "video_pruning_rate": pruning.rate, "video_pruning_method": pruning.method}
    start = time.perf_counter()
    llm = LLM(model=model_dir, hf_overrides={"intp": intp} if intp else None, disable_log_stats=False, **engine)
    startup = time.perf_counter() - start
    hf_config = llm.llm_engine.model_config.hf_config
    video_id, encoder_frames = hf_config.video_token_index, default_encoder_frames(hf_config)
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
