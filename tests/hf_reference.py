"""HF transformers Video-LLaVA and LLaVA-NeXT-Video as the numeric reference for parity tests."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=4)
def load_hf_model(model_dir: str, rope_parameters_json: str | None = None, intp_json: str | None = None):
    """The HF model (Video-LLaVA, or LLaVA-NeXT-Video by its config) in float32; optionally with
    other `rope_parameters` (JSON) on its Llama, and an `intp` section (JSON) for the grouping
    (ours, hf_video_llava.py, when the tower has temporal attention)."""
    import json

    from transformers import AutoConfig

    from intp_vllm.research.hf_video_llava import hf_model_class

    config = AutoConfig.from_pretrained(model_dir)
    model_class = hf_model_class(config)
    if rope_parameters_json is not None:
        config.text_config.rope_parameters = json.loads(rope_parameters_json)
        config.text_config.max_position_embeddings = max(config.text_config.max_position_embeddings, 16384)
    if intp_json is not None:
        config.intp = json.loads(intp_json)
    model = model_class.from_pretrained(model_dir, config=config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_pixel_values(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Frames (T, H, W, 3) through HF's CLIPImageProcessor (PIL) -> (1, T, 3, S, S)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    pixels = processor(images=list(frames), return_tensors="np")["pixel_values"]
    return torch.from_numpy(pixels)[None]


@contextlib.contextmanager
def pruned_video_features(model, pruning, cls_token: bool = True):
    """HF's video features pruned by `pruning` (`vllm_ext.pruning.VideoPruning`; each frame's
    first token kept with `cls_token`) while the block runs: HF then fills the prompt's video
    tokens, as many as are kept, with the kept features in frame-time order. Video-LLaVA's
    features are one (frames, tokens_per_frame, hidden) tensor, LLaVA-NeXT-Video's a tuple of one
    such tensor per video."""
    get_video_features = model.model.get_video_features

    def prune(features):
        flat = features.flatten(0, 1)
        return flat[pruning.retention_mask(flat, features.shape[0], cls_token)][None]

    @functools.wraps(get_video_features)  # HF's generate reads its signature
    def pruned(*args, **kwargs):
        output = get_video_features(*args, **kwargs)
        features = output.pooler_output
        output.pooler_output = prune(features) if torch.is_tensor(features) else tuple(map(prune, features))
        return output

    model.model.get_video_features = pruned
    try:
        yield model
    finally:
        del model.model.get_video_features


def hf_generate(model, prompt_ids: list[int], pixel_values: torch.Tensor, max_new_tokens: int, pruning=None,
                cls_token: bool = True):
    """Greedy new tokens and the log-probability of every prompt token after the first; with
    `pruning`, of the video's kept tokens (`pruned_video_features`)."""
    if pruning is not None and pruning.rate:
        with pruned_video_features(model, pruning, cls_token):
            return hf_generate(model, prompt_ids, pixel_values, max_new_tokens)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values_videos=pixel_values).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        prompt_logprobs = logprobs[:-1].gather(1, input_ids[0, 1:, None])[:, 0]
        generated = model.generate(
            input_ids=input_ids,
            pixel_values_videos=pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return generated[0, len(prompt_ids):].tolist(), prompt_logprobs.numpy()


def vllm_prompt_logprobs(output) -> np.ndarray:
    """vLLM's prompt_logprobs (first entry None) as an array aligned with `hf_generate`'s."""
    return np.array(
        [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])]
    )
