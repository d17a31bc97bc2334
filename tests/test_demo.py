"""`intp-vllm demo` (what `make demo` runs), end to end in vLLM's default compiled mode."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def test_demo_answers_the_flash_that_8_frame_sampling_misses(tmp_path):
    run = subprocess.run([sys.executable, "-m", "intp_vllm.apps.cli", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = dict(re.findall(r"^\s*([^:\n]+?): (.*)$", run.stdout, flags=re.MULTILINE))
    truth = report["truth"].split()[0]
    assert report["answer, all frames (INTP)"] == truth
    assert report["video tokens (INTP)"] == str(64 * 17)
    assert (tmp_path / "needle-64-frames.mkv").stat().st_size > 0
    assert "the flash was not in any sampled frame" in report["answer, 8 sampled frames"]
    assert report["motion question"].endswith("truth: fast)")
    assert report["answer, interleaved groups"] == "fast" and report["answer, consecutive groups"] == "slow"
    assert (tmp_path / "speed-32-frames.mkv").stat().st_size > 0
