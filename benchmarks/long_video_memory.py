"""What a long video costs the server in memory: idle RSS by --max-frames, and the growth for one
1024-frame request on a 10-minute 1080p file.

The file: the 10-minute 1080p H.264 file of `decode_cost.py` (30 fps, 18,000 frames, GOP 250, two
B-frames; `decode_cost.write_hd`), written once into --work-dir, shared by both benchmarks.

idle     `intp-vllm serve assets/needle-video-llava --max-frames N` for N in 128, 512, 1024 (no
         memory flag): the server's processes' RSS once it answers /health, and the CPU KV cache
         the plugin reserved (its log line).
request  the server at --max-frames 1024, asked once about the 1080p file as a file:// video_url at
         `mm_processor_kwargs {"frames": 1024}`, one token generated: each server process's peak
         RSS during the request (its VmHWM, reset when idle: /proc/PID/clear_refs) less its idle
         RSS, and their sum (an upper bound of the tree's growth: the peaks need not coincide).

    python -m intp_vllm_benchmarks.long_video_memory     # ~15 min on 2 cores (+ 10-40 min writing the file once)
                                                         #   -> benchmarks/results/long_video/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "needle-video-llava"
IDLE_MAX_FRAMES = (128, 512, 1024)
REQUEST_FRAMES = 1024
KV_LOG = re.compile(r"intp_vllm: CPU KV cache (\d+) MiB")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip() or str(pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`intp-vllm serve` of the needle model in its own process group, its log in `log`."""

    def __init__(self, max_frames: int, media_dir: Path, log: Path, *flags: str):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(MODEL), "--max-frames", str(max_frames),
                   "--port", str(self.port), "--allowed-local-media-path", str(media_dir),
                   "--trust-request-mm-kwargs", *flags]
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.time() + 1200  # start-up profiles a --max-frames video: minutes on a loaded machine
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5)
                return
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError("server did not start in 1200 s")

    def rss_kib(self) -> dict[int, int]:
        return {pid: status_kib(pid, "VmRSS:") for pid in tree(self.proc.pid)}

    def kv_cache_mib(self) -> int | None:
        found = KV_LOG.findall(self.log.read_text())
        return int(found[-1]) if found else None

    def chat(self, video: Path, frames: int) -> dict:
        body = {"model": str(MODEL), "max_tokens": 1, "temperature": 0,
                "mm_processor_kwargs": {"frames": frames},
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": "What colour flashed?"}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=1800) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def settled_rss(server: Server, seconds: float = 10) -> dict[int, int]:
    time.sleep(seconds)  # start-up's frees returned to the OS
    return server.rss_kib()


def bench_idle(work_dir: Path, media_dir: Path) -> list[dict]:
    rows = []
    for max_frames in IDLE_MAX_FRAMES:
        server = Server(max_frames, media_dir, work_dir / f"serve-{max_frames}.log")
        try:
            rss = settled_rss(server)
            rows.append({"max_frames": max_frames, "idle_rss_mib": round(sum(rss.values()) / 1024, 1),
                         "processes": len(rss), "kv_cache_mib": server.kv_cache_mib()})
        finally:
            server.stop()
        print(rows[-1], flush=True)
    return rows


def bench_request(work_dir: Path, video: Path) -> dict:
    # a deadline for a loaded machine (the default's 16 x 30 s for 1024 frames may not do there): memory is the point
    server = Server(REQUEST_FRAMES, video.parent, work_dir / f"serve-request-{REQUEST_FRAMES}.log",
                    "--video-fetch-timeout", "120")
    try:
        idle = settled_rss(server)
        for pid in idle:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        reply = server.chat(video, REQUEST_FRAMES)
        seconds = time.perf_counter() - started
        peaks = {pid: status_kib(pid, "VmHWM:") for pid in idle}
        after = server.rss_kib()
        per_process = [{"process": process_name(pid), "idle_rss_mib": round(idle[pid] / 1024, 1),
                        "peak_growth_mib": round((peaks[pid] - idle[pid]) / 1024, 1),
                        "rss_after_mib": round(after.get(pid, 0) / 1024, 1)} for pid in idle]
        row = {"frames": REQUEST_FRAMES, "prompt_tokens": reply["usage"]["prompt_tokens"],
               "seconds": round(seconds, 1), "idle_rss_mib": round(sum(idle.values()) / 1024, 1),
               "peak_growth_mib": round(sum(p["peak_growth_mib"] for p in per_process), 1),
               "rss_growth_after_mib": round((sum(after.values()) - sum(idle.values())) / 1024, 1),
               "processes": per_process}
    finally:
        server.stop()
    print(row, flush=True)
    return row


def main(argv=None) -> dict:
    from intp_vllm_benchmarks.decode_cost import FILES, HD_FPS, HD_GOP, HD_HEIGHT, HD_MINUTES, HD_WIDTH, write_hd
    from intp_vllm_benchmarks.long_video import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "long-video")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_video")
    parser.add_argument("--parts", nargs="+", default=["idle", "request"], choices=["write", "idle", "request"])
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    video = args.work_dir / FILES["ten_min_1080p"]
    out = args.out / "memory.json"
    report = {"machine": machine(), "model": MODEL.name}
    if not video.exists():
        report["video"] = {"path": video.name, "minutes": HD_MINUTES, "fps": HD_FPS,
                           "size": f"{HD_WIDTH}x{HD_HEIGHT}", "gop": HD_GOP, "b_frames": 2, **write_hd(video)}
    if "idle" in args.parts:
        report["idle"] = bench_idle(args.work_dir, video.parent)
    if "request" in args.parts:
        report["request"] = bench_request(args.work_dir, video)
    for part in ("idle", "request"):
        if part in args.parts:
            report[f"{part}_load_average"] = Path("/proc/loadavg").read_text().split()[0]  # at the end of the part
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**(json.loads(out.read_text()) if out.exists() else {}), **report}  # parts run separately add up
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
