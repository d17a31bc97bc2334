"""Endpoint req/s: plain `intp-vllm serve` against `serve --ray` with 1, 2, ... replicas.

The same closed-loop load (`load_test.run_load`: --clients concurrent clients, each sending its
requests one after another, greedy chat completions about one video) against each server in
turn, started fresh, warmed up (--clients x 2 requests), then timed. The servers take turns
in every round (--rounds), so the machine's drift hits them alike; the best round of each is
reported, every round is in the JSON. Ratios: each Ray run against its 1-replica run (the
scaling, ideally x replicas when the machine has the cores or GPUs) and Ray 1 replica against
plain serve (what Serve's proxy, ingress and router cost).

This machine (default): the tiny checkpoint, a local Ray instance per Ray server, each replica
cores / replicas OpenMP threads; plain serve uses every core.

    python benchmarks/bench_ray_serve.py                                  # ~15 min on 2 cores
    python benchmarks/bench_ray_serve.py --model /models/Video-LLaVA-7B-hf --video /data/clip.mp4 \\
        --ray-address auto --replicas 1,2,4 --clients 64 --server-args "--frames 32 --tensor-parallel-size 2"

On a GPU cluster run it on the head node (the plain server then runs there too); --video must be
readable at the same path on every node (it is sent as a file:// URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
from pathlib import Path

from intp_vllm.apps.ray_serve import READY_MESSAGE
from intp_vllm.machine import machine_name
from intp_vllm_benchmarks.load_test import (LoadResult, chat_request, launch, run_load, served_model,
                                            tiny_server_args, video_url, write_clip)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ray_serve"


def server_command(model: Path, server_args: list[str], replicas: int | None, ray_address: str | None) -> list[str]:
    """`intp-vllm serve` (replicas None) or `serve --ray --replicas N` for `model`."""
    command = [sys.executable, "-m", "intp_vllm.apps.cli", "serve", str(model), *server_args]
    if replicas is not None:
        command += ["--ray", "--replicas", str(replicas)] + (["--ray-address", ray_address] if ray_address else [])
    return command


def measure(command: list[str], ray: bool, video: Path, clients: int, requests: int, max_tokens: int) -> LoadResult:
    """Start the server, warm it up, time the load, stop it."""
    with launch(command, ready_line=READY_MESSAGE if ray else None) as (base_url, _):
        body = chat_request(served_model(base_url), video_url(video.resolve(), as_data_url=False), max_tokens)
        warm = asyncio.run(run_load(base_url, body, clients, 2))
        if warm.failed:
            raise RuntimeError(f"warm-up failed: {warm.summary()}")
        return asyncio.run(run_load(base_url, body, clients, requests))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the tiny random-weight one, built here)")
    parser.add_argument("--video", type=Path, help="video to ask about (default: a generated 24-frame clip)")
    parser.add_argument("--replicas", default="1,2", help="Ray replica counts, comma-separated (default 1,2)")
    parser.add_argument("--ray-address", help="an existing cluster (default: a local Ray instance per server)")
    parser.add_argument("--server-args", default="", help="more `intp-vllm serve` flags, one string")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="timed requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where ray_serve.json goes")
    args = parser.parse_args(argv)
    replica_counts = [int(n) for n in args.replicas.split(",")]

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        video = args.video or write_clip(workdir)
        if args.model:
            model = args.model
            server_args = ["--allowed-local-media-path", str(video.resolve().parent),
                           "--max-in-flight-requests", str(max(64, args.clients))]
        else:
            from intp_vllm.research.tiny_model import make_tiny_model

            model = make_tiny_model(workdir / "tiny-model")
            # no memory flag: with --ray each replica sizes its KV cache for the replicas sharing a node
            server_args = tiny_server_args(video.parent, args.clients, kv_cache_bytes=None)
        server_args += shlex.split(args.server_args)
        runs = {"plain serve": None, **{f"ray {n} replica{'s' * (n > 1)}": n for n in replica_counts}}
        rounds: dict[str, list[dict]] = {name: [] for name in runs}
        print(f"{args.clients} clients x {args.requests} requests, {args.rounds} rounds ({machine_name()})", flush=True)
        for round_ in range(args.rounds):
            for name, replicas in runs.items():
                result = measure(server_command(model, server_args, replicas, args.ray_address),
                                 replicas is not None, video, args.clients, args.requests, args.max_tokens)
                print(f"round {round_ + 1} {name}: {result.summary()}", flush=True)
                rounds[name].append(result.as_dict())
    best = {name: max(results, key=lambda r: r["req_per_s"]) for name, results in rounds.items()}
    one = best[next(name for name in runs if runs[name] == 1)] if 1 in replica_counts else None
    ratios = {f"{name} / plain serve": best[name]["req_per_s"] / best["plain serve"]["req_per_s"]
              for name in runs if runs[name] is not None}
    if one:
        ratios.update({f"{name} / ray 1 replica": best[name]["req_per_s"] / one["req_per_s"]
                       for name, n in runs.items() if n and n > 1})
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_name(), "model": str(args.model or "tiny (TinyModelSpec)"),
              "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "server_args": server_args, "ray_address": args.ray_address, "best": best, "ratios": ratios,
              "rounds": rounds}
    (args.out / "ray_serve.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out / 'ray_serve.json'}")
    if any(r["failed"] for results in rounds.values() for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
