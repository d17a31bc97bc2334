"""Load test: N concurrent clients x M chat requests with a video against `intp-vllm serve`.

Each client sends its requests one after another; all clients run at once. The run is
bounded in count (N x M) and in time (--max-seconds: clients stop starting requests;
--request-timeout: per request), so it always stops by itself. Prints requests by HTTP
status, p50/p99 latency of the successful ones and req/s; exits 1 if any request failed.

    python benchmarks/load_test.py --clients 32 --requests 100     # starts a tiny-checkpoint server
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --video /data/clip.mp4

Without --url it builds the tiny random-weight checkpoint, writes a 24-frame video and
starts `intp-vllm serve` on 127.0.0.1 with --max-in-flight-requests at least --clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from intp_vllm.machine import machine_name

QUESTION = "What is happening in this video?"
STARTUP_TIMEOUT_S = 300
TEST_KV_BYTES = 256 << 20


@dataclass
class LoadResult:
    """Outcome of one run: latency of each successful request, count of each status."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    def summary(self) -> str:
        total = sum(self.statuses.values())
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items(), key=str))
        lines = [
            f"requests: {total} ({statuses}); failed: {self.failed}",
            f"latency of successful requests: p50 {self.percentile_ms(50):.0f} ms, p99 {self.percentile_ms(99):.0f} ms",
            f"throughput: {len(self.latencies_s) / self.wall_s:.2f} req/s over {self.wall_s:.1f} s",
        ]
        return "\n".join(lines + [f"  e.g. {error}" for error in self.errors[:3]])

    def as_dict(self) -> dict:
        return {"statuses": {str(k): v for k, v in self.statuses.items()}, "failed": self.failed,
                "p50_ms": self.percentile_ms(50), "p99_ms": self.percentile_ms(99), "wall_s": self.wall_s,
                "req_per_s": len(self.latencies_s) / self.wall_s}


def chat_request(model: str, video_url: str, max_tokens: int = 8, text: str = QUESTION, videos: int = 1) -> dict:
    """A greedy chat completion about a video (repeated `videos` times)."""
    content = [{"type": "video_url", "video_url": {"url": video_url}}] * videos + [{"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0.0}


async def run_load(base_url: str, body: dict, clients: int, requests_per_client: int,
                   request_timeout_s: float = 120.0, max_seconds: float = 600.0) -> LoadResult:
    """`clients` concurrent loops of `requests_per_client` POSTs of `body`; stops starting
    requests after `max_seconds` (those never sent are counted as "not sent")."""
    import aiohttp

    result = LoadResult()
    url = f"{base_url}/v1/chat/completions"
    deadline = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=clients)
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(_client(session, url, body, requests_per_client, deadline, result)
                               for _ in range(clients)))
    result.wall_s = time.perf_counter() - start
    return result


async def _client(session, url: str, body: dict, count: int, deadline: float, result: LoadResult) -> None:
    import aiohttp

    for sent in range(count):
        if time.monotonic() > deadline:
            result.statuses["not sent"] += count - sent
            return
        start = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, text = type(exc).__name__, str(exc)
        result.statuses[status] += 1
        if status == 200:
            result.latencies_s.append(time.perf_counter() - start)
        else:
            result.errors.append(f"{status}: {text[:300]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_dir: str | Path, server_args: list[str], startup_timeout_s: float = STARTUP_TIMEOUT_S):
    """`intp-vllm serve` on 127.0.0.1 until the block ends; yields its base URL."""
    with launch([sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(model_dir), *server_args],
                startup_timeout_s) as (base_url, _):
        yield base_url


@contextmanager
def launch(command: list[str], startup_timeout_s: float = STARTUP_TIMEOUT_S, ready_line: str | None = None):
    """A server `command` (given --host 127.0.0.1 --port P here) until the block ends, once it is
    ready: GET /health answers 200 or, with `ready_line`, its log has that text (`serve --ray`
    has no /health, and answers /v1/models before its replicas are up); yields (base URL, its
    log so far as a callable returning the text)."""
    port = free_port()
    command = [*command, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)

        def log_text() -> str:
            log.seek(0)
            return log.read()

        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_ready(process, base_url, log_text, ready_line, startup_timeout_s)
            yield base_url, log_text
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ready(process, base_url: str, log_text, ready_line: str | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_text()[-3000:]}")
        if ready_line is not None:
            if ready_line in log_text():
                return
        else:
            try:
                if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy after {timeout_s:.0f} s")
        time.sleep(1)


def served_model(base_url: str) -> str:
    return requests.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def tiny_server_args(media_dir: Path, clients: int, kv_cache_bytes: int | None = TEST_KV_BYTES) -> list[str]:
    """CPU-sized engine for the tiny checkpoint, admitting every client at once; with
    `kv_cache_bytes` None, the plugin sizes the KV cache."""
    memory = [] if kv_cache_bytes is None else ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return ["--dtype", "float32", "--enforce-eager", *memory, "--max-num-seqs", "32", "--seed", "0",
            "--allowed-local-media-path", str(media_dir), "--max-in-flight-requests", str(max(64, clients))]


def video_url(path: Path, as_data_url: bool) -> str:
    if as_data_url:
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    return f"file://{path}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start a tiny-checkpoint server)")
    parser.add_argument("--video", type=Path, help="video to ask about (default: a generated 24-frame clip)")
    parser.add_argument("--data-url", action="store_true", help="send the video inline as base64, not file://")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop starting requests after this")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        video = args.video or write_clip(Path(workdir))
        if args.url:
            result = _run(args, args.url, video)
        else:
            from intp_vllm.research.tiny_model import make_tiny_model

            model_dir = make_tiny_model(Path(workdir) / "tiny-model")
            with serve(model_dir, tiny_server_args(video.parent, args.clients)) as base_url:
                result = _run(args, base_url, video)
    print(result.summary())
    if args.json:
        record = {"clients": args.clients, "requests_per_client": args.requests, "machine": machine_name(),
                  **result.as_dict()}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(1 if result.failed else 0)


def write_clip(directory: Path) -> Path:
    """directory/clip.mp4: 24 frames of moving shapes, 100x72, H.264."""
    from intp_vllm.research.synthetic import moving_shapes_video
    from intp_vllm.video.io import write_video

    return write_video(directory / "clip.mp4", moving_shapes_video(num_frames=24, height=72, width=100, seed=7))


def _run(args, base_url: str, video: Path) -> LoadResult:
    body = chat_request(served_model(base_url), video_url(video.resolve(), args.data_url), args.max_tokens)
    print(f"{args.clients} clients x {args.requests} requests against {base_url} ({machine_name()})", flush=True)
    return asyncio.run(run_load(base_url, body, args.clients, args.requests, args.request_timeout, args.max_seconds))


if __name__ == "__main__":
    main()
