"""Needle accuracy at 32-128x the encoder's window: `eval-needle` at 256, 512 and 1024 frames.

The committed needle model (assets/needle-video-llava: 8-frame window, trained context 141
tokens, 17 tokens a frame) on drifting-scene clips, through vLLM with the plugin, per frame
count in its own `needle_eval.evaluate` call (one frame count's clips in memory at a time: 200
clips of 1024 frames are 1.9 GB), cells in the order given, each frame count's report written as
soon as it is done (`runs/long-needle/frames-N-ROPES.json`), then all of them merged into one report with the
heatmap and the accuracy-against-tokens frontier:

    nice -n 10 python -m intp_vllm_benchmarks.long_needle --frames 256,512,1024 --tasks order \\
        --rope yarn,ntk --pruning evs:0.875,vidcom2:0.875 --clips 200
        -> benchmarks/results/long_needle/needle_eval.{json,png}, needle_frontier.png

Merging only: `--merge-only` (every frames-*.json in --work-dir).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from intp_vllm_benchmarks.long_video import ROOT


def parse_prunings(text: str):
    from intp_vllm.vllm_ext.pruning import VideoPruning

    prunings = [VideoPruning()]
    for item in filter(None, text.split(",")):
        method, rate = item.split(":")
        prunings.append(VideoPruning(rate=float(rate), method=method))
    return tuple(prunings)


def merge(reports: list[dict]) -> dict:
    """One report over the frame counts of `reports` (each one frame count's `evaluate` output)."""
    merged = dict(reports[0])
    merged["frames"] = sorted({f for report in reports for f in report["frames"]})
    merged["rope_types"] = list(dict.fromkeys(r for report in reports for r in report["rope_types"]))
    merged["methods"] = list(dict.fromkeys(m for report in reports for m in report["methods"]))
    merged["seconds"] = round(sum(report["seconds"] for report in reports), 1)
    merged["runs"] = [{"frames": r["frames"][0], "rope_types": r["rope_types"], "methods": r["methods"],
                       "seconds": r["seconds"]} for r in reports]
    merged["results"] = {}
    for report in reports:
        for task, rows in report["results"].items():
            for method, cells in rows.items():
                merged["results"].setdefault(task, {}).setdefault(method, {}).update(cells)
    methods = [m for m in merged["methods"]
               if all(str(f) in merged["results"][t].get(m, {}) for t in merged["results"] for f in merged["frames"])]
    merged["methods"] = methods  # only methods measured at every frame count are plotted
    return merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "needle-video-llava"))
    parser.add_argument("--frames", default="256,512,1024")
    parser.add_argument("--tasks", default="order")
    parser.add_argument("--rope", default="yarn,ntk")
    parser.add_argument("--pruning", default="evs:0.75,vidcom2:0.75,evs:0.875,vidcom2:0.875,evs:0.9375,vidcom2:0.9375",
                        help="comma-separated method:rate, asked besides unpruned")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "long-needle")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_needle")
    parser.add_argument("--merge-only", action="store_true")
    args = parser.parse_args(argv)
    from intp_vllm.research.needle_eval import evaluate, write_report

    args.work_dir.mkdir(parents=True, exist_ok=True)
    frames = [int(f) for f in args.frames.split(",")]
    if not args.merge_only:
        started = time.perf_counter()

        def log(line: str) -> None:
            print(f"[{time.perf_counter() - started:7.0f} s] {line}", flush=True)

        for f in frames:
            report = evaluate(args.model, [f], args.rope.split(","), clips_per_cell=args.clips,
                              tasks=tuple(args.tasks.split(",")), seed=args.seed,
                              prunings=parse_prunings(args.pruning), scene="drifting", log=log)
            (args.work_dir / f"frames-{f}-{args.rope.replace(',', '+')}.json").write_text(json.dumps(report, indent=1))
    reports = [json.loads(path.read_text()) for path in sorted(args.work_dir.glob("frames-*.json"))]
    merged = merge(sorted(reports, key=lambda r: r["frames"][0]))
    for path in write_report(merged, args.out):
        print("wrote", path)
    return merged


if __name__ == "__main__":
    main()
