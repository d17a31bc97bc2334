"""Proof at CI size: a model trained here on 8-frame clips, asked about 32-frame videos through vLLM.

Trains the needle model briefly (the "what colour flashed?" task only), serves it through
the plugin, and checks that reading all 32 frames with scaled RoPE beats the 8-frame
sampling baseline by a wide margin (sampling sees the flash in about 1 clip of 4), and that
HF transformers scores the same on the same clips. The full eval (both tasks, 8-128 frames,
every RoPE type, n = 300) is `intp-vllm eval-needle`.
"""

from __future__ import annotations

import json

import pytest

from intp_vllm.needle import TrainConfig, train_needle
from intp_vllm.needle_eval import SAMPLING_ROW, difference_interval, evaluate, wilson_interval, write_report
from intp_vllm_benchmarks.needle_hf_parity import parity

CI_TRAINING = TrainConfig(max_steps=150, single_task_steps=150, eval_every=50, eval_clips=64)


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


def test_intervals_match_newcombes_published_examples():
    """Newcombe (1998): Wilson interval of 81/263; hybrid score interval of 56/70 - 48/80 and 9/10 - 3/10."""
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=1e-4)
