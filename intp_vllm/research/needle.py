"""A Video-LLM trained here on 8-frame clips, with answers we know: the proof that INTP works.

No real Video-LLaVA weights can be fetched here, so `intp-vllm train-needle` trains a tiny
HF `VideoLlavaForConditionalGeneration` from scratch on synthetic clips: grey-noise frames
with coloured squares flashed in one or two of them, and two questions —
"What colour flashed?" (one needle) and "Which came first?" (two needles of different
colours). Trained at 8 frames (a context of 142 tokens), it is then asked about 32-128
frame videos through vLLM (`needle_eval.py`), where INTP is the only way to see them whole.
`--tasks speed` trains on the motion task instead ("How fast did it move?", `make_motion_clip`),
whose answer lies in how frames differ: the test of INTP's frame grouping.

The recipe (clips, tasks, tokenizer, shapes NEEDLE_SPEC, optimiser and schedule, stopping rule)
is one for every architecture; `--architecture llava-next-video` trains a tiny HF
`LlavaNextVideoForConditionalGeneration` instead (per-frame CLIP, CLS dropped, 2x2 average
pooling: 4 tokens a frame, an 8-frame context of 38 tokens). What differs per architecture is
the HF config and class (`tiny_model.hf_config_and_class`) and the tokens a frame (the plugin's
adapter for it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from intp_vllm.video.preprocess import ClipPreprocessConfig, preprocess_frames
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.research.synthetic import COLOURS
from intp_vllm.research.tiny_model import SPECIAL_TOKENS, TinyModelSpec

TASKS = {"flash": "What colour flashed?", "order": "Which came first?"}
"""The needle tasks: what a needle model is trained and evaluated on by default."""
MOTION_TASKS = {"speed": "How fast did it move?"}
"""A task that needs the encoder's temporal window (`make_motion_clip`)."""
QUESTIONS = {**TASKS, **MOTION_TASKS}
"""Every task's question (the one table; a task's index here seeds its held-out clips)."""
FRAME_SIZE = 56
PATCH_SIZE = 14
TRAIN_FRAMES = 8
WORDS = ["USER:", "ASSISTANT:", "What", "colour", "flashed?", "Which", "came", "first?"]
SPEEDS = {"slow": 7, "fast": 28}
"""Answer of the speed task -> pixels the texture travels over the whole clip, whatever its
frame count: at TRAIN_FRAMES frames 1 and 4 px a frame."""
MOTION_WORDS = ["How", "fast", "did", "it", "move?", "slow"]
"""After the colours in the vocabulary, so that the needle model's token ids are unchanged."""
TEXTURE_CELL = 7
"""Pixels per cell of the speed task's texture: smooth over a few pixels, so a shift of 1 px
keeps it alike and one of 4 px does not."""


@dataclass
class NeedleClip:
    frames: np.ndarray  # (F, 56, 56, 3) uint8
    task: str
    answer: str
    needle_frames: tuple[int, ...]


SCENES = ("noise", "static", "drifting")
"""The background of a clip: grey noise drawn anew every frame (what the model is trained on;
no two frames alike), one noise image held still, or one panning by a pixel every
DRIFT_FRAMES frames. The last two are redundant in time, as real video is, which token
pruning exploits."""
DRIFT_FRAMES = 4


def _background(rng: np.random.Generator, num_frames: int, scene: str) -> np.ndarray:
    if scene == "noise":
        return np.repeat(rng.integers(96, 160, size=(num_frames, FRAME_SIZE, FRAME_SIZE, 1), dtype=np.uint8), 3, -1)
    if scene not in SCENES:
        raise ValueError(f"scene {scene!r} is not one of {', '.join(SCENES)}")
    pan = (num_frames - 1) // DRIFT_FRAMES if scene == "drifting" else 0
    image = np.repeat(rng.integers(96, 160, size=(FRAME_SIZE, FRAME_SIZE + pan, 1), dtype=np.uint8), 3, -1)
    shifts = np.arange(num_frames) // DRIFT_FRAMES if scene == "drifting" else np.zeros(num_frames, int)
    return np.stack([image[:, shift:shift + FRAME_SIZE] for shift in shifts])


def make_motion_clip(rng: np.random.Generator, num_frames: int) -> NeedleClip:
    """The speed task: the whole frame is one smooth random texture (grey cells of TEXTURE_CELL
    px, bilinearly blended) sliding left, right, up or down, `slow` or `fast` (SPEEDS: pixels
    over the whole clip, so a clip of more frames is the same motion sampled more densely).
    No single frame says anything about the answer: only how frames differ does, which a tower
    with temporal attention over its window sees directly; a per-frame tower leaves it to the
    language model, which learns it 5x slower (benchmarks/motion_window.py)."""
    from PIL import Image

    answer = ("slow", "fast")[int(rng.integers(2))]
    travel = SPEEDS[answer]
    side = FRAME_SIZE + max(SPEEDS.values())
    cells = rng.integers(64, 192, size=(side // TEXTURE_CELL + 2, side // TEXTURE_CELL + 2), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(cells).resize((cells.shape[1] * TEXTURE_CELL, cells.shape[0] * TEXTURE_CELL),
                                                       Image.BILINEAR))
    offsets = np.rint(np.linspace(0, travel, num_frames)).astype(int) if num_frames > 1 else np.zeros(1, int)
    start = int(rng.integers(0, side - FRAME_SIZE - travel + 1))
    across = int(rng.integers(0, side - FRAME_SIZE + 1))
    direction = int(rng.integers(4))  # 0 right, 1 left, 2 down, 3 up: the texture moves that way
    frames = np.empty((num_frames, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    for t, offset in enumerate(offsets):
        along = start + (travel - offset if direction in (0, 2) else offset)
        window = (texture[across:across + FRAME_SIZE, along:along + FRAME_SIZE] if direction < 2
                  else texture[along:along + FRAME_SIZE, across:across + FRAME_SIZE])
        frames[t] = window[..., None]
    return NeedleClip(frames, "speed", answer, ())


def make_clip(rng: np.random.Generator, num_frames: int, task: str, scene: str = "noise") -> NeedleClip:
    """A `scene` background (SCENES) with one (flash) or two (order) frames showing a coloured
    square of 28-42 px; for "speed", `make_motion_clip` (its own scene)."""
    if task in MOTION_TASKS:
        return make_motion_clip(rng, num_frames)
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(QUESTIONS)}")
    frames = _background(rng, num_frames, scene)
    names = list(COLOURS)
    count = 1 if task == "flash" else 2
    needle_frames = tuple(sorted(rng.choice(num_frames, size=count, replace=False).tolist()))
    colours = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
    for frame, colour in zip(needle_frames, colours):
        side = int(rng.integers(28, 43))
        top, left = rng.integers(0, FRAME_SIZE - side + 1, size=2)
        frames[frame, top:top + side, left:left + side] = COLOURS[colour]
    return NeedleClip(frames, task, colours[0], needle_frames)


def make_clips(seed: int, count: int, num_frames: int, tasks: tuple[str, ...] = tuple(TASKS),
               scene: str = "noise") -> list[NeedleClip]:
    rng = np.random.default_rng(seed)
    return [make_clip(rng, num_frames, tasks[i % len(tasks)], scene) for i in range(count)]


def build_tokenizer():
    """A word-level tokenizer over the prompt words and the colour names."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from intp_vllm.core.prompt import VIDEO_LLAVA_CHAT_TEMPLATE

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + list(COLOURS) + MOTION_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    fast.chat_template = VIDEO_LLAVA_CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    max_steps: int = 1200
    single_task_steps: int = 250
    eval_every: int = 50
    eval_clips: int = 256
    target_accuracy: float = 0.98
    temporal_attention: bool = False
    """Give the tower temporal attention over its 8-frame window (temporal_attention.py; Video-LLaVA)."""
    architecture: str = "video-llava"
    """The model trained (tiny_model.ARCHITECTURES): Video-LLaVA, or LLaVA-NeXT-Video (per-frame
    tower, 2x2 pooling, no CLS: 4 tokens a frame at 56 px)."""
    tasks: tuple[str, ...] = tuple(TASKS)
    """What it is trained on (keys of QUESTIONS); the first alone for `single_task_steps`."""

    def __post_init__(self):
        from intp_vllm.research.tiny_model import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.temporal_attention and self.architecture != "video-llava":
            raise ValueError(f"temporal attention is for video-llava only: {self.architecture}'s tower is per frame")


NEEDLE_SPEC = TinyModelSpec(frames=TRAIN_FRAMES, image_size=FRAME_SIZE, patch_size=PATCH_SIZE, vision_hidden=64,
                            vision_layers=2, vision_heads=2, text_hidden=128, text_layers=3, text_heads=4,
                            text_kv_heads=4, text_intermediate=384)
"""The needle model's shapes, whatever its architecture (CLIP 64 wide, 2 layers; Llama 128 wide,
3 layers); its context is set to the 8-frame prompt's length (`build_model`)."""


def video_tokens_per_frame(model_class, config) -> int:
    """Video tokens a frame of `config`'s model (`model_class`: its HF class), as the plugin's
    adapter for that architecture counts them: Video-LLaVA 17 at 56 px (16 patches + CLS),
    LLaVA-NeXT-Video 4 (16 patches pooled 2x2, no CLS)."""
    from intp_vllm.vllm_ext.plugin import model_class as adapter_class

    return adapter_class(model_class.__name__).tokens_per_frame(config)


def build_model(tokenizer, seed: int, temporal_attention: bool = False, architecture: str = "video-llava"):
    """The untrained needle model of `architecture` (tiny_model.ARCHITECTURES) at NEEDLE_SPEC, HF's
    own initialisation at `seed`, its LM context exactly the 8-frame prompt (`prompt_ids` of the
    flash task): past it, positions are new to the model. A LLaVA-NeXT-Video records in its
    `intp` section that it was trained at TRAIN_FRAMES frames (the plugin's default for the
    architecture is 32). Raises ValueError for an unknown architecture, or temporal attention
    on LLaVA-NeXT-Video."""
    import torch

    from intp_vllm.research.tiny_model import hf_config_and_class

    spec = replace(NEEDLE_SPEC, temporal_attention_heads=2 if temporal_attention else 0)
    config, model_class = hf_config_and_class(architecture, spec, tokenizer)
    per_frame = video_tokens_per_frame(model_class, config)
    config.text_config.max_position_embeddings = len(prompt_ids(tokenizer, "flash", TRAIN_FRAMES * per_frame))
    if architecture == "llava-next-video":
        config.intp = {"frames": TRAIN_FRAMES}
    torch.manual_seed(seed)
    return model_class(config)


def prompt_ids(tokenizer, task: str, video_tokens: int) -> list[int]:
    """Prompt token ids with the video placeholder expanded, as vLLM's processor does."""
    ids = tokenizer(VIDEO_PROMPT.format(question=QUESTIONS[task])).input_ids
    video = tokenizer.convert_tokens_to_ids("<video>")
    at = ids.index(video)
    return ids[:at] + [video] * video_tokens + ids[at + 1:]


def _batch(model, tokenizer, clips: list[NeedleClip]):
    import torch

    per_frame = video_tokens_per_frame(type(model), model.config)
    preprocess = ClipPreprocessConfig(shortest_edge=FRAME_SIZE, crop_size=FRAME_SIZE)
    pixels = torch.from_numpy(np.stack([preprocess_frames(c.frames, preprocess) for c in clips]))
    ids = torch.tensor([prompt_ids(tokenizer, c.task, len(c.frames) * per_frame) for c in clips])
    targets = torch.tensor([tokenizer.convert_tokens_to_ids(c.answer) for c in clips])
    return ids, pixels, targets


def answer_logits(model, ids, pixels):
    return model(input_ids=ids, pixel_values_videos=pixels, logits_to_keep=1).logits[:, -1]


def predictions(model, tokenizer, clips: list[NeedleClip], batch_size: int = 64):
    """The answer token id the model gives each clip (greedy, one token)."""
    import torch

    answers = []
    with torch.no_grad():
        for start in range(0, len(clips), batch_size):
            ids, pixels, _ = _batch(model, tokenizer, clips[start:start + batch_size])
            answers.append(answer_logits(model, ids, pixels).argmax(-1))
    return torch.cat(answers)


def accuracy(model, tokenizer, clips: list[NeedleClip], batch_size: int = 64) -> float:
    import torch

    targets = torch.tensor([tokenizer.convert_tokens_to_ids(c.answer) for c in clips])
    return int((predictions(model, tokenizer, clips, batch_size) == targets).sum()) / len(clips)


def _learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_needle(output_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train until both tasks reach `target_accuracy` on held-out 8-frame clips; save an HF checkpoint."""
    import torch

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, cfg.seed, cfg.temporal_attention, cfg.architecture)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    rng = np.random.default_rng(cfg.seed)
    validation = {task: make_clips(cfg.seed + 1000 + i, cfg.eval_clips // 2, TRAIN_FRAMES, (task,))
                  for i, task in enumerate(cfg.tasks)}
    history, started = [], time.perf_counter()
    scores = {task: 0.0 for task in cfg.tasks}
    step = 0
    for step in range(1, cfg.max_steps + 1):
        tasks = cfg.tasks[:1] if step <= cfg.single_task_steps else cfg.tasks
        clips = [make_clip(rng, TRAIN_FRAMES, tasks[int(rng.integers(len(tasks)))]) for _ in range(cfg.batch_size)]
        model.train()
        ids, pixels, targets = _batch(model, tokenizer, clips)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, pixels), targets)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, cfg)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg.eval_every == 0:
            model.eval()
            scores = {task: accuracy(model, tokenizer, clips) for task, clips in validation.items()}
            history.append({"step": step, "loss": loss.item(), **scores})
            log(f"step {step}: loss {history[-1]['loss']:.3f}, 8-frame accuracy "
                + ", ".join(f"{t} {a:.3f}" for t, a in scores.items()))
            if step > cfg.single_task_steps and min(scores.values()) >= cfg.target_accuracy:
                break
    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    from intp_vllm.research.tiny_model import write_preprocessor_config

    write_preprocessor_config(output_dir, NEEDLE_SPEC)
    report = {"config": asdict(cfg), "steps": step, "seconds": round(time.perf_counter() - started, 1),
              "accuracy_8_frames": scores, "history": history}
    (output_dir / "training.json").write_text(json.dumps(report, indent=2))
    return report
