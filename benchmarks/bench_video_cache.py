"""Time to first token of a chat's turn two against turn one, with and without the decoded-video
cache (`intp-vllm serve --video-cache-bytes`, docs/robustness.md "Multi-turn chats").

One server per setting (the cache off: `--video-cache-bytes 0`; on: the default), started fresh;
against each, for each way of sending the video (file://, data:, http), turn one asks about the
video, turn two sends the conversation so far with the video attached again and a follow-up
question, and turn two again repeats it (streamed; TTFT is the first content chunk's arrival).
Each way sends its own bytes (the same H.264 file with a different trailing byte after the
moov, which decoders ignore), so no turn one finds another's frames or prefix cached. The
machine's load drifts: the servers take turns in every round (--rounds), all rounds are in
the JSON.

    python benchmarks/bench_video_cache.py                          # tiny checkpoint, 1080p, 128 frames
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from intp_vllm.machine import machine_name
from intp_vllm_benchmarks.bench_frontend import write_h264
from intp_vllm_benchmarks.load_test import serve, served_model, tiny_server_args

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "video_cache" / "ttft.json"
QUESTIONS = ("What is happening in this video?", "And what moves fastest?")
SOURCES = ("file", "data", "http")


def ttft(base_url: str, body: dict) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    started = time.monotonic()
    with requests.post(f"{base_url}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.monotonic() - started
    raise RuntimeError(f"no content streamed for {body['messages'][-1]}")


def turns(model: str, url: str) -> tuple[dict, dict]:
    """(turn one, turn two with the video attached again) for `url`."""
    def user(text: str) -> dict:
        return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                            {"type": "text", "text": text}]}

    common = {"model": model, "max_tokens": 4, "temperature": 0.0}
    first = {**common, "messages": [user(QUESTIONS[0])]}
    second = {**common, "messages": [user(QUESTIONS[0]), {"role": "assistant", "content": "A square moves."},
                                     user(QUESTIONS[1])]}
    return first, second


def http_server(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """`directory` over http on 127.0.0.2 (allowed by the server's --allowed-media-networks)."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.2", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.2:{httpd.server_address[1]}"


def measure(model_dir: Path, media: Path, base: bytes, cache_bytes: int | None, frames: int, round_: int,
            http_url: str, sources: list[str], fetch_timeout_s: float) -> dict:
    """TTFT of turn one, two and two again for each source, on a fresh server."""
    args = [*tiny_server_args(media, clients=1), "--max-frames", str(frames), "--frames", str(frames),
            "--allowed-media-networks", "127.0.0.2/32", "--video-fetch-timeout", str(fetch_timeout_s)]
    if cache_bytes is not None:
        args += ["--video-cache-bytes", str(cache_bytes)]
    results = {}
    with serve(model_dir, args, startup_timeout_s=1200) as base_url:
        model = served_model(base_url)
        for i, source in enumerate(sources):
            data = base + bytes([round_, i, int(cache_bytes is None)])  # bytes of its own: nothing cached before
            path = media / f"{source}-{round_}-{cache_bytes}.mp4"
            path.write_bytes(data)
            url = {"file": f"file://{path}", "data": "data:video/mp4;base64," + base64.b64encode(data).decode(),
                   "http": f"{http_url}/{path.name}"}[source]
            first, second = turns(model, url)
            results[source] = {"turn_1_s": ttft(base_url, first), "turn_2_s": ttft(base_url, second),
                               "turn_2_again_s": ttft(base_url, second)}
            print(f"round {round_} cache {'default' if cache_bytes is None else cache_bytes} {source}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in results[source].items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    from intp_vllm.research.tiny_model import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=8, help="length of the 1080p video")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sources", default=",".join(SOURCES), help="how the video is sent: file,data,http")
    parser.add_argument("--caches", default="0,default", help="--video-cache-bytes settings: 0 and/or default")
    parser.add_argument("--fetch-timeout", type=float, default=600.0,
                        help="the servers' --video-fetch-timeout (a loaded machine decodes 1080p slowly)")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(tmp / "model")
        media = tmp / "media"
        media.mkdir()
        clip = write_h264(tmp / "clip.mp4", 1920, 1080, args.seconds)
        base = clip.read_bytes()
        httpd, http_url = http_server(media)
        try:
            caches = [None if cache == "default" else int(cache) for cache in args.caches.split(",")]
            rounds = [{str(cache): measure(model_dir, media, base, cache, args.frames, r, http_url,
                                           args.sources.split(","), args.fetch_timeout)
                       for cache in caches} for r in range(args.rounds)]
        finally:
            httpd.shutdown()
    result = {"machine": machine_name(), "load_average": os.getloadavg(), "frames": args.frames,
              "video": {"width": 1920, "height": 1080, "seconds": args.seconds, "bytes": len(base)},
              "settings": {"0": "--video-cache-bytes 0", "None": "the default cache (256 MiB)"}, "rounds": rounds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
