"""Proof at CI size: a model trained here on 8-frame clips, asked about 32-frame videos through vLLM.

Trains the needle model briefly (the "what colour flashed?" task only), serves it through
the plugin, and checks that reading all 32 frames with scaled RoPE beats the 8-frame
sampling baseline by a wide margin (sampling sees the flash in about 1 clip of 4), and that
HF transformers scores the same on the same clips. The full eval (both tasks, 8-128 frames,
every RoPE type, n = 300) is `intp-vllm eval-needle`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from intp_vllm.research.needle import TrainConfig, train_needle
from intp_vllm.research.needle_eval import SAMPLING_ROW, evaluate, mcnemar_exact, wilson_interval, write_report
from intp_vllm_benchmarks.needle_hf_parity import paired_comparison, parity

CI_TRAINING = TrainConfig(max_steps=150, single_task_steps=150, eval_every=50, eval_clips=64)


@pytest.mark.slow
def test_trained_model_reads_32_frames_better_than_8_frame_sampling(tmp_path):
    report = train_needle(tmp_path / "needle", CI_TRAINING)
    assert report["accuracy_8_frames"]["flash"] >= 0.9, report["history"]

    results = evaluate(str(tmp_path / "needle"), [32], ["yarn"], clips_per_cell=40, tasks=("flash",),
                       engine_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 128 << 20})
    flash = results["results"]["flash"]
    all_frames, sampled = flash["yarn"]["32"], flash[SAMPLING_ROW]["32"]
    assert sampled["needles_caught"] < 0.5
    assert all_frames["accuracy"] >= 0.8
    assert all_frames["accuracy"] >= sampled["accuracy"] + 0.3, flash

    json_path, png_path = write_report(results, tmp_path / "report")
    assert json.loads(json_path.read_text())["results"]["flash"]["yarn"]["32"]["n"] == 40
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same clips through HF transformers at the plugin's per-request scale score the same
    hf = parity(results)
    assert hf["cells_agreeing"] == hf["cells"] == 2, hf["rows"]
    assert hf["largest_difference"] <= 0.05, hf["rows"]
    assert all(row["same_answer"] >= 0.95 for row in hf["rows"]), hf["rows"]


def test_intervals_match_published_examples():
    """Newcombe (1998): Wilson interval of 81/263. Exact McNemar by hand: 6 vs 1 discordant clips
    is 2 x (1 + 7) / 2^7, 1 vs 9 is 2 x (1 + 10) / 2^10."""
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    for total in (8, 100, 300):  # a perfect score lies in its own interval, not above it by rounding
        assert wilson_interval(total, total)[1] == 1.0 and wilson_interval(0, total)[0] == 0.0
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


def test_paired_comparison_can_tell_methods_apart():
    """Equal accuracy with different clips right is not a difference; one method right on 12 more
    clips than the other is (the negative control an interval on two accuracies would miss)."""
    from intp_vllm.research.needle import NeedleClip

    clips = [NeedleClip(None, "flash", "red", ()) for _ in range(100)]
    swapped = paired_comparison({"answers": ["red"] * 50 + ["blue"] * 50}, ["blue"] * 50 + ["red"] * 50, clips)
    assert swapped["plugin"] == swapped["hf"] == 0.5 and swapped["same_answer"] == 0.0
    assert swapped["mcnemar_p"] == 1.0 and swapped["agree"]
    better = paired_comparison({"answers": ["red"] * 62 + ["blue"] * 38}, ["red"] * 50 + ["blue"] * 50, clips)
    assert better["only_plugin_right"] == 12 and better["only_hf_right"] == 0
    assert better["mcnemar_p"] < 0.001 and not better["agree"]
    with pytest.raises(ValueError, match="no per-clip answers: re-run intp-vllm eval-needle"):
        paired_comparison({"accuracy": 0.5}, ["red"] * 100, clips)


def test_groupings_are_compared_clip_by_clip():
    """Interleaved right on 12 clips consecutive gets wrong (and none the other way) is a
    difference (McNemar p < 0.001); the same accuracy with different clips right is not."""
    from intp_vllm.research.needle import NeedleClip
    from intp_vllm.research.needle_eval import compare_groupings

    clips = [NeedleClip(None, "speed", "fast", ()) for _ in range(100)]
    answers = {"yarn, interleaved": ["fast"] * 62 + ["slow"] * 38, "yarn, consecutive": ["fast"] * 50 + ["slow"] * 50,
               "ntk, interleaved": ["fast"] * 50 + ["slow"] * 50, "ntk, consecutive": ["slow"] * 50 + ["fast"] * 50}
    report = {"groupings": ["interleaved", "consecutive"], "rope_types": ["yarn", "ntk"],
              "prunings": [{"method": "evs", "rate": 0.0}],
              "results": {"speed": {label: {"32": {"answers": a, "accuracy": a.count("fast") / 100}}
                                    for label, a in answers.items()}}}
    yarn, ntk = compare_groupings(report, {(32, "speed"): clips})
    assert (yarn["interleaved"], yarn["consecutive"], yarn["only_interleaved_right"], yarn["only_consecutive_right"]) \
        == (0.62, 0.5, 12, 0) and yarn["mcnemar_p"] < 0.001
    assert ntk["interleaved"] == ntk["consecutive"] == 0.5 and ntk["only_interleaved_right"] == 50
    assert ntk["mcnemar_p"] == 1.0


@pytest.mark.parametrize("scene", ["static", "drifting"])
def test_redundant_scenes_repeat_their_background(scene):
    """Static: every frame without a needle is the same image; drifting: the image pans by a
    pixel every DRIFT_FRAMES frames. Noise clips are drawn as before (the training distribution)."""
    import numpy as np

    from intp_vllm.research.needle import DRIFT_FRAMES, make_clip

    clip = make_clip(np.random.default_rng(3), 32, "order", scene)
    plain = [t for t in range(32) if t not in clip.needle_frames]
    for a, b in zip(plain, plain[1:]):
        shifted = scene == "drifting" and a // DRIFT_FRAMES != b // DRIFT_FRAMES
        if not shifted:
            assert np.array_equal(clip.frames[a], clip.frames[b]), (a, b)
        elif b == a + 1:
            assert np.array_equal(clip.frames[a][:, 1:], clip.frames[b][:, :-1])
    noise = make_clip(np.random.default_rng(3), 32, "order")
    assert not np.array_equal(noise.frames[plain[0]], noise.frames[plain[1]])
    assert np.array_equal(noise.frames, make_clip(np.random.default_rng(3), 32, "order", "noise").frames)
    with pytest.raises(ValueError, match="scene 'snow' is not one of noise, static, drifting"):
        make_clip(np.random.default_rng(3), 8, "flash", "snow")


def _travel(first, last) -> tuple[int, int]:
    """(axis, signed shift) that maps `first` onto `last`: the texture's motion between them."""
    import numpy as np

    for shift in range(0, 30):
        for axis in (1, 0):
            for sign in (1, -1):
                a = np.moveaxis(first, axis, 0)[: first.shape[axis] - shift] if sign > 0 \
                    else np.moveaxis(first, axis, 0)[shift:]
                b = np.moveaxis(last, axis, 0)[shift:] if sign > 0 else np.moveaxis(last, axis, 0)[: last.shape[axis] - shift]
                if np.array_equal(a, b):
                    return axis, sign * shift
    raise AssertionError("the last frame is not the first one shifted")


@pytest.mark.parametrize("frames", [8, 32])
def test_speed_clips_slide_one_texture_by_their_answer_s_distance(frames):
    """The whole clip travels SPEEDS[answer] px, whatever its frame count; frames in between
    step evenly (rounded); both answers and all four directions occur."""
    import numpy as np

    from intp_vllm.research.needle import SPEEDS, make_clips

    clips = make_clips(11, 40, frames, ("speed",))
    assert {c.answer for c in clips} == set(SPEEDS) and all(c.needle_frames == () for c in clips)
    directions = set()
    for clip in clips:
        assert clip.frames.shape == (frames, 56, 56, 3) and clip.frames.dtype == np.uint8
        axis, shift = _travel(clip.frames[0], clip.frames[-1])
        assert abs(shift) == SPEEDS[clip.answer], clip.answer
        directions.add((axis, shift > 0))
        steps = [abs(_travel(a, b)[1]) for a, b in zip(clip.frames, clip.frames[1:])]
        assert sum(steps) == SPEEDS[clip.answer] and max(steps) - min(steps) <= 1, steps
    assert len(directions) == 4


@pytest.mark.engine
def test_pruned_cells_report_their_tokens_and_plot_the_frontier(tmp_path, monkeypatch):
    """eval-needle with pruning asked per request, on the committed needle model and a drifting
    scene: each cell records its video tokens; the report gains the accuracy-vs-tokens plot.
    The clips go to the engine 5 a call (ASK_FRAMES), the last call short, answers in order."""
    from intp_vllm.research import needle_eval
    from intp_vllm.vllm_ext.pruning import VideoPruning

    monkeypatch.setattr(needle_eval, "ASK_FRAMES", 5 * 32)

    evs = VideoPruning("evs", 0.75)
    results = evaluate("assets/needle-video-llava", [32], ["yarn"], clips_per_cell=24, tasks=("order",),
                       prunings=(VideoPruning(), evs), scene="drifting",
                       engine_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 128 << 20})
    order = results["results"]["order"]
    assert order["yarn"]["32"]["video_tokens"] == 32 * 17
    assert order["yarn, evs 0.75"]["32"]["video_tokens"] == evs.kept_tokens(32, 17) < 32 * 17 / 3
    assert order["yarn, evs 0.75"]["32"]["accuracy"] >= order[SAMPLING_ROW]["32"]["accuracy"] + 0.3, order
    paths = write_report(results, tmp_path)
    assert [p.name for p in paths] == ["needle_eval.json", "needle_eval.png", "needle_frontier.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
def test_interleaved_groups_read_speed_that_consecutive_chunks_miss():
    """The paper's claim at CI size, on the committed speed model (temporal attention over its
    8-frame window): at 32 frames interleaved groups show the encoder motion at its trained
    stride and it answers; consecutive chunks show a quarter of it and it says "slow". The
    same clips both ways, compared clip by clip; HF transformers gives the plugin's answers."""
    results = evaluate("assets/motion-video-llava-temporal", [32], ["yarn"], clips_per_cell=40, tasks=("speed",),
                       groupings=("interleaved", "consecutive"),
                       engine_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 128 << 20})
    speed = results["results"]["speed"]
    assert speed["yarn, interleaved"]["32"]["accuracy"] >= 0.9, speed
    assert speed["yarn, consecutive"]["32"]["accuracy"] <= 0.7, speed
    (row,) = results["grouping_comparison"]
    assert row["only_interleaved_right"] > 10 * max(1, row["only_consecutive_right"]) and row["mcnemar_p"] < 1e-3
    hf = parity(results)
    assert hf["cells_agreeing"] == hf["cells"] == 3, hf["rows"]
    assert all(r["same_answer"] >= 0.95 for r in hf["rows"]), hf["rows"]


def test_task_flags_name_the_tasks_allowed(capsys):
    from intp_vllm.apps.cli import build_parser

    args = build_parser().parse_args(["train-needle", "out", "--tasks", "speed"])
    assert args.tasks == ("speed",)
    assert build_parser().parse_args(["eval-needle", "--model", "m"]).tasks == ("flash", "order")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval-needle", "--model", "m", "--tasks", "speed,spin"])
    assert "unknown task(s) ['spin']; choose from flash,order,speed" in capsys.readouterr().err


NEXT_NEEDLE = "assets/needle-llava-next-video"


@pytest.mark.engine
def test_committed_llava_next_video_needle_model_reads_its_8_frame_clips():
    """The committed LLaVA-NeXT-Video needle model (per-frame tower, 2x2 pooling: 4 tokens a
    frame) through the plugin's engine answers held-out 8-frame clips of both tasks as trained,
    with varied answers (no constant guess scores this), and at 32 frames, read whole with
    YaRN, beats 8-frame sampling of the same clips on the order task."""
    results = evaluate(NEXT_NEEDLE, [8, 32], ["yarn"], clips_per_cell=24,
                       engine_kwargs={"enforce_eager": True, "kv_cache_memory_bytes": 128 << 20})
    assert results["results"]["flash"]["yarn"]["8"]["video_tokens"] == 8 * 4
    for task in ("flash", "order"):
        cell = results["results"][task]["yarn"]["8"]
        assert cell["accuracy"] >= 23 / 24, (task, cell)
        assert len(set(cell["answers"])) >= 4, cell["answers"]
    order = results["results"]["order"]
    assert order["yarn"]["32"]["accuracy"] >= order[SAMPLING_ROW]["32"]["accuracy"] + 0.3, order


@pytest.mark.slow
def test_train_needle_writes_a_llava_next_video_checkpoint_like_the_committed_one(tmp_path):
    """`train-needle --architecture llava-next-video` for 2 steps writes what the committed model
    is (the engine test above loads that one): the same config, tensor names and shapes, which HF
    transformers loads as LlavaNextVideoForConditionalGeneration; its context is the 8-frame
    prompt (8 x 4 video tokens and the question) and its `intp` section says it saw 8 frames."""
    from safetensors.numpy import load_file
    from transformers import LlavaNextVideoForConditionalGeneration

    from intp_vllm.apps.cli import main

    main(["train-needle", str(tmp_path / "next"), "--architecture", "llava-next-video", "--max-steps", "2"])
    committed = json.loads((Path(NEXT_NEEDLE) / "config.json").read_text())
    written = json.loads((tmp_path / "next" / "config.json").read_text())
    assert written == committed
    assert written["architectures"] == ["LlavaNextVideoForConditionalGeneration"] and written["intp"] == {"frames": 8}
    assert written["text_config"]["max_position_embeddings"] == 38
    shapes = {name: tensor.shape for name, tensor in load_file(tmp_path / "next" / "model.safetensors").items()}
    assert shapes == {name: tensor.shape for name, tensor in load_file(Path(NEXT_NEEDLE) / "model.safetensors").items()}
    _, info = LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "next", output_loading_info=True)
    assert not any(info.values()), info  # every tensor loaded, none missing, unexpected or mismatched
    training = json.loads((tmp_path / "next" / "training.json").read_text())
    assert training["steps"] == 2 and training["config"]["architecture"] == "llava-next-video"


def test_train_needle_refuses_temporal_attention_on_a_per_frame_tower():
    from intp_vllm.research.needle import TrainConfig

    with pytest.raises(ValueError, match="temporal attention is for video-llava only: llava-next-video's tower is "
                                         "per frame"):
        TrainConfig(architecture="llava-next-video", temporal_attention=True)
    with pytest.raises(ValueError, match="architecture 'llava' is not one of video-llava, llava-next-video"):
        TrainConfig(architecture="llava")
