"""Write small random-weight Video-LLaVA and LLaVA-NeXT-Video checkpoints in HF format.

Tests and the demo need a checkpoint that both HF transformers and vLLM load, with
nothing downloaded. Weights are drawn with std 0.2 (not HF's 0.02): at 0.02 the logits
are so flat that greedy tokens barely depend on the input, and a wrong RoPE base or
frame order would pass a parity test unnoticed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from intp_vllm.core.config import tokens_per_frame
from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<video>", "<pad>"]
ARCHITECTURES = ("video-llava", "llava-next-video")
"""The models tiny checkpoints are written for (`--architecture` of make-tiny-model, train-needle)."""

_TOKENIZER_CORPUS = """
USER: ASSISTANT: What is happening in this video? Describe the video in detail. A red circle moves from
the left to the right while a blue square stays still. The green triangle appears at the
end. Which colour came first? What colour flashed? The person walks into the room, picks
up a cup and drinks. How many objects are there? The answer is yes. The answer is no.
red green blue yellow white black orange purple circle square triangle left right top
bottom first last before after moving still fast slow one two three four five six seven
eight nine ten the a an is are was were it this that there what which who where when
""".split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Shapes of a generated checkpoint; defaults are small enough for CPU tests."""

    frames: int = 8
    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    max_position_embeddings: int = 2048
    vocab_size: int | None = None
    weight_std: float = 0.2
    seed: int = 0
    rope_theta: float = 10000.0
    temporal_attention_heads: int = 0
    """> 0: the tower mixes the frames of each clip (temporal_attention.py) with this many heads."""
    dtype: str = "float32"
    """The saved weights' torch dtype (recorded in config.json): "bfloat16" as the hub's 7B files."""


def real_shape_spec(text_layers: int = 1, vision_layers: int = 2) -> TinyModelSpec:
    """Video-LLaVA-7B's published shapes (Vicuna-7B + CLIP ViT-L/14 at 224) with fewer layers."""
    return TinyModelSpec(
        image_size=224,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=vision_layers,
        vision_heads=16,
        text_hidden=4096,
        text_layers=text_layers,
        text_heads=32,
        text_kv_heads=32,
        text_intermediate=11008,
        max_position_embeddings=4096,
        vocab_size=32064,
        weight_std=0.02,
    )


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained locally on a fixed word list, with Video-LLaVA's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(_TOKENIZER_CORPUS)] * 4, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    fast.chat_template = VIDEO_LLAVA_CHAT_TEMPLATE
    return fast


def build_config(spec: TinyModelSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    vocab = spec.vocab_size or len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    per_frame = tokens_per_frame(spec.image_size, spec.patch_size)
    config = VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_seq_length=per_frame - 1,
        video_seq_length=per_frame * spec.frames,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    if spec.temporal_attention_heads:
        config.temporal_attention = {"frames": spec.frames, "num_heads": spec.temporal_attention_heads}
    return config


def write_preprocessor_config(path: Path, spec: TinyModelSpec) -> None:
    from intp_vllm.video.preprocess import CLIP_MEAN, CLIP_STD

    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": spec.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "num_frames": spec.frames,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


_TOWER_WITHOUT_VISION_MODEL = re.compile(r"^(video|image|vision)_tower\.(?!vision_model\.)")


def _hub_name(name: str) -> str:
    return _TOWER_WITHOUT_VISION_MODEL.sub(r"\1_tower.vision_model.", name)


def rename_to_hub_layout(path: Path) -> None:
    """Rename tensors as the hub's Video-LLaVA-7B-hf (`video_tower.vision_model.*`) and
    LLaVA-NeXT-Video-7B-hf (`vision_tower.vision_model.*`) files have them.

    transformers >= 5 drops `vision_model.` when it saves; real checkpoints keep it.
    """
    from safetensors.torch import load_file, save_file

    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        renamed = {_hub_name(name): tensor for name, tensor in tensors.items()}
        save_file(renamed, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_hub_name(name): shard for name, shard in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def make_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(), hub_names: bool = False) -> Path:
    """Write config, safetensors, tokenizer, chat template and preprocessor config to `path`.

    `hub_names` writes tensor names as the published checkpoints have them.
    """
    tokenizer = build_tokenizer()
    config, model_class = hf_config_and_class("video-llava", spec, tokenizer)
    return save_random_checkpoint(path, model_class, config, tokenizer, spec, hub_names)


def save_random_checkpoint(path: str | Path, model_class, config, tokenizer, spec: TinyModelSpec,
                           hub_names: bool) -> Path:
    """`model_class(config)` with random weights (seed `spec.seed`: std `spec.weight_std`, norm
    weights 1 and biases 0) saved to `path` with `tokenizer` and the preprocessor config;
    `hub_names` renames tensors as the published checkpoints name them. Returns `path`."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # LayerNorm/RMSNorm weights near 1, biases near 0
                param.copy_(torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))
            else:
                param.normal_(0.0, spec.weight_std)
    model.to(getattr(torch, spec.dtype)).save_pretrained(path)
    if hub_names:
        rename_to_hub_layout(path)
    tokenizer.save_pretrained(path)
    write_preprocessor_config(path, spec)
    return path


def build_llava_next_video_config(spec: TinyModelSpec, tokenizer, rope_linear: float | None = None):
    """A LlavaNextVideoConfig of `spec`'s shapes (CLIP + Llama, 2x2 average pooling); with
    `rope_linear`, the language model carries linear RoPE scaling by that factor (as the 7B-hf)."""
    from transformers import LlavaNextVideoConfig

    video_llava = build_config(spec, tokenizer)
    text = video_llava.text_config
    if rope_linear is not None:
        text.rope_parameters = {"rope_type": "linear", "factor": float(rope_linear), "rope_theta": spec.rope_theta}
    return LlavaNextVideoConfig(
        vision_config=video_llava.vision_config,
        text_config=text,
        image_token_index=video_llava.image_token_index,
        video_token_index=video_llava.video_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
    )


def hf_config_and_class(architecture: str, spec: TinyModelSpec, tokenizer):
    """(HF config, HF model class) of `architecture` (ARCHITECTURES) at `spec`'s shapes: Video-LLaVA
    (`build_config`; ours with temporal attention when `spec` asks for it) or LLaVA-NeXT-Video
    (`build_llava_next_video_config`). Raises ValueError for another name, or temporal attention
    on LLaVA-NeXT-Video (its tower is per frame)."""
    if architecture == "video-llava":
        from intp_vllm.research.hf_video_llava import hf_model_class

        config = build_config(spec, tokenizer)
        return config, hf_model_class(config)
    if architecture == "llava-next-video":
        from transformers import LlavaNextVideoForConditionalGeneration

        if spec.temporal_attention_heads:
            raise ValueError("temporal attention is for Video-LLaVA only: LLaVA-NeXT-Video's tower is per frame")
        return build_llava_next_video_config(spec, tokenizer), LlavaNextVideoForConditionalGeneration
    raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")


def real_shape_llava_next_video_spec(text_layers: int = 1, vision_layers: int = 2) -> TinyModelSpec:
    """LLaVA-NeXT-Video-7B's published shapes (Vicuna-7B + CLIP ViT-L/14 at 336) with fewer layers."""
    return replace(real_shape_spec(text_layers, vision_layers), image_size=336)


def make_tiny_llava_next_video(path: str | Path, spec: TinyModelSpec = TinyModelSpec(image_size=112),
                               rope_linear: float | None = None, hub_names: bool = False) -> Path:
    """Write a random LLaVA-NeXT-Video checkpoint (config, safetensors, tokenizer with chat
    template, CLIP preprocessor config) to `path`; weights std `spec.weight_std`, norms at 1/0.
    At the default 112 px / 14 px patches a frame is 4 x 4 = 16 pooled tokens. `hub_names`
    writes tensor names as the published checkpoints have them."""
    from transformers import LlavaNextVideoForConditionalGeneration

    tokenizer = build_tokenizer()
    config = build_llava_next_video_config(spec, tokenizer, rope_linear)
    return save_random_checkpoint(path, LlavaNextVideoForConditionalGeneration, config, tokenizer, spec, hub_names)
