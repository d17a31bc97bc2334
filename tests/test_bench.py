"""`intp-vllm bench`: the FLOP count against a hand count, and a --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from intp_vllm.apps.bench import ModelShape, decoder_flops, make_workload, request_flops
from intp_vllm.vllm_ext.pruning import VideoPruning

ONE_LAYER = ModelShape(image_size=28, patch_size=14, vision_hidden=2, vision_intermediate=8, vision_layers=1,
                       text_hidden=2, text_intermediate=3, text_layers=1, heads=1, kv_heads=1, head_dim=2, vocab=5)


def test_decoder_flops_equals_a_hand_count():
    # Per token: q, k, v, o are 2x2 (16 multiply-adds), gate, up, down 2x3 (18): 2 * 34 = 68 FLOPs.
    # Attention: the token at position p reads p + 1 keys, 2 multiply-adds each for QK^T and AV
    # (head_dim 2): 8 (p + 1) FLOPs. Positions 0 and 1: 68 + 8 + 68 + 16 = 160.
    assert decoder_flops(0, 2, ONE_LAYER) == 160
    assert decoder_flops(2, 3, ONE_LAYER) == 68 + 24
    assert decoder_flops(0, 2, ONE_LAYER) + decoder_flops(2, 3, ONE_LAYER) == decoder_flops(0, 3, ONE_LAYER)


def test_request_flops_split_prefill_and_decode():
    # 3 prompt tokens, 2 output tokens: prefill covers positions 0..2, decode feeds back 1 token;
    # the LM head (2 x 5) runs once per output token.
    flops = request_flops(ONE_LAYER, frames=1, prompt_tokens=3, output_tokens=2)
    assert flops["prefill"] == decoder_flops(0, 3, ONE_LAYER) + 2 * 2 * 5
    assert flops["decode"] == decoder_flops(3, 4, ONE_LAYER) + 2 * 2 * 5
    assert flops["vision"] > 0 and flops["projector"] == 2 * 5 * (2 * 2 + 2 * 2)


def test_workload_mixes_every_pair_and_changes_videos_per_round():
    first, second = make_workload(9, (8, 16, 32), (8, 32, 64), 0), make_workload(9, (8, 16, 32), (8, 32, 64), 1)
    assert {(r.frames, r.max_tokens) for r in first} == {(f, t) for f in (8, 16, 32) for t in (8, 32, 64)}
    assert [(r.frames, r.max_tokens) for r in first] == [(r.frames, r.max_tokens) for r in second]
    assert not {r.seed for r in first} & {r.seed for r in second}


@pytest.mark.engine
def test_quick_bench_end_to_end(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "intp_vllm.apps.cli", "bench", "--quick", "--pruning-rate",
                                "0.5", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["machine"]["name"] and report["peak_flops"] > 0
    settings = report["settings"]
    assert list(report["runs"]) == ["hf_generate", "plugin_8f", "intp_16f", "unscaled_16f", "intp_16f_evs0.5"]
    requests = report["workload"]
    for name, run in report["runs"].items():
        for key in ("seconds", "req_per_s", "frames_per_s", "prompt_tokens_per_s", "output_tokens_per_s",
                    "ttft_mean_s", "kv_bytes_per_request", "peak_rss_mib", "achieved_flops_per_s"):
            assert run[key] > 0, (name, key)
        assert all(value > 0 for value in run["flops"].values()), name
        assert 0 < run["mfu"] <= 1, name
        assert run["output_tokens"] == sum(r["max_tokens"] for r in requests), name
        expected_frames = sum(min(r["frames"], run["frames_read"]) for r in requests)
        assert run["frames"] == expected_frames, name
        assert len(run["round_seconds"]) == settings["repeats"]
    # the same visual tokens for INTP and its unscaled twin, so their FLOPs are equal
    runs = report["runs"]
    assert runs["intp_16f"]["flops"] == runs["unscaled_16f"]["flops"]
    # pruning: the encoder still sees every frame; vLLM's EVS count of the patch tokens (17 a frame:
    # 16 patches + CLS, which is kept) reach the language model, whose prefill and KV cache shrink
    intp, pruned = runs["intp_16f"], runs["intp_16f_evs0.5"]
    assert pruned["pruning"] == {"method": "evs", "rate": 0.5} and intp["pruning"] is None
    assert pruned["frames"] == intp["frames"] and pruned["flops"]["vision"] == intp["flops"]["vision"]
    evs = VideoPruning("evs", 0.5)
    assert pruned["video_tokens"] == sum(evs.kept_tokens(min(r["frames"], 16), 17) for r in requests)
    assert intp["video_tokens"] == intp["frames"] * 17 > pruned["video_tokens"]
    assert pruned["flops"]["prefill"] < intp["flops"]["prefill"]
    saved = report["kv_bytes_per_token"] * (intp["video_tokens"] - pruned["video_tokens"]) / len(requests)
    assert intp["kv_bytes_per_request"] - pruned["kv_bytes_per_request"] == pytest.approx(saved)
    assert set(report["goals"]) == {"plugin_vs_hf_time_ratio", "intp_overhead", "pruning_speedup"}
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
