"""Needle accuracy at 32-128x the encoder's window: `eval-needle` at 256, 512 and 1024 frames.

The committed needle model (assets/needle-video-llava: 8-frame window, trained context 141
tokens, 17 tokens a frame) on drifting-scene clips, through vLLM with the plugin, per frame
count in its own `needle_eval.evaluate` call (one frame count's clips in memory at a time: 200
clips of 1024 frames are 1.9 GB), cells in the order given, each frame count's report written as
soon as it is done (`runs/long-needle/frames-N-ROPES.json`), then all of them merged into one report with the
32-128-frame results of `benchmarks/results/pruning/` (same seed and scene) into one
accuracy-against-tokens frontier:

    nice -n 10 python -m intp_vllm_benchmarks.long_needle --frames 256,512,1024 --tasks order \\
        --rope yarn,ntk --pruning evs:0.875,vidcom2:0.875 --clips 200
        -> benchmarks/results/long_needle/needle_eval.json, needle_frontier.png

Merging only: `--merge-only` (every frames-*.json in --work-dir).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from intp_vllm_benchmarks.long_video import ROOT


def parse_prunings(text: str, unpruned: bool = True):
    from intp_vllm.vllm_ext.pruning import VideoPruning

    prunings = [VideoPruning()] if unpruned else []
    for item in filter(None, text.split(",")):
        method, rate = item.split(":")
        prunings.append(VideoPruning(rate=float(rate), method=method))
    return tuple(prunings)


def merge(reports: list[dict]) -> dict:
    """One report over the frame counts and methods of `reports` (`evaluate` outputs, or reports
    merged before); a cell measured twice keeps the later report's. `methods` lists every method measured anywhere:
    the frontier plot skips the cells a method lacks."""
    merged = dict(reports[0])
    merged["frames"] = sorted({f for report in reports for f in report["frames"]})
    merged["rope_types"] = list(dict.fromkeys(r for report in reports for r in report["rope_types"]))
    merged["methods"] = list(dict.fromkeys(m for report in reports for m in report["methods"]))
    merged["seconds"] = round(sum(report["seconds"] for report in reports), 1)
    merged["runs"] = [run for report in reports for run in report.get("runs") or [
        {"frames": report["frames"], "rope_types": report["rope_types"], "methods": report["methods"],
         "clips_per_cell": report["clips_per_cell"], "seconds": report["seconds"]}]]  # a merged report keeps its runs
    merged["clips_per_cell"] = sorted({run["clips_per_cell"] for run in merged["runs"]})
    merged["results"] = {}
    for report in reports:
        for task, rows in report["results"].items():
            for method, cells in rows.items():
                merged["results"].setdefault(task, {}).setdefault(method, {}).update(cells)
    return merged


def plot_frontier(report: dict, path: Path, tasks: list[str]) -> Path:
    """Accuracy (95% Wilson interval) against video tokens per request on `tasks`, one line per
    method through the frame counts it was measured at (labelled), 8-frame sampling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from intp_vllm.research.needle import QUESTIONS
    from intp_vllm.research.needle_eval import SAMPLING_ROW

    fig, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in [SAMPLING_ROW] + report["methods"]:
            cells = [(f, report["results"][task].get(row, {}).get(str(f))) for f in report["frames"]]
            cells = [(f, cell) for f, cell in cells if cell]
            if not cells:
                continue
            x = [cell["video_tokens"] for _, cell in cells]
            y = [cell["accuracy"] for _, cell in cells]
            err = [[max(0.0, a - cell["ci95"][0]) for a, (_, cell) in zip(y, cells)],
                   [max(0.0, cell["ci95"][1] - a) for a, (_, cell) in zip(y, cells)]]
            ax.errorbar(x, y, yerr=err, marker="s" if row == SAMPLING_ROW else "o", capsize=2, label=row,
                        linestyle="--" if row == SAMPLING_ROW else "-", markersize=3)
            for (f, cell), xi, yi in zip(cells, x, y):
                ax.annotate(f"{f}" + ("" if cell["n"] >= 200 else f" (n={cell['n']})"), (xi, yi),
                            textcoords="offset points", xytext=(3, -10), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("video tokens per request (labels: frames in the video; the window is 8)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}: {QUESTIONS[task]} ({report['scene']} scene)")
        ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.suptitle(f"needle model, accuracy against tokens, n={report['clips_per_cell']} a cell "
                 f"({report['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets" / "needle-video-llava"))
    parser.add_argument("--frames", default="256,512,1024")
    parser.add_argument("--tasks", default="order")
    parser.add_argument("--rope", default="yarn,ntk")
    parser.add_argument("--pruning", default="evs:0.75,vidcom2:0.75,evs:0.875,vidcom2:0.875,evs:0.9375,vidcom2:0.9375",
                        help="comma-separated method:rate, asked besides unpruned")
    parser.add_argument("--skip-unpruned", action="store_true",
                        help="ask only the --pruning cells (the unpruned cell, the costliest, measured in another run)")
    parser.add_argument("--tag", default="", help="appended to this run's report name, so runs of one frame count and "
                        "rope type with different cells are merged, not overwritten")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "long-needle")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_needle")
    parser.add_argument("--merge-only", action="store_true")
    parser.add_argument("--with-report", type=Path, nargs="*",
                        default=[ROOT / "benchmarks" / "results" / "pruning" / "needle_eval.json"],
                        help="earlier eval-needle reports to draw beside (default: 32-128 frames, same clips seed "
                             "and scene)")
    args = parser.parse_args(argv)
    from intp_vllm.research.needle_eval import evaluate

    args.work_dir.mkdir(parents=True, exist_ok=True)
    frames = [int(f) for f in args.frames.split(",")]
    if not args.merge_only:
        started = time.perf_counter()

        def log(line: str) -> None:
            print(f"[{time.perf_counter() - started:7.0f} s] {line}", flush=True)

        for f in frames:
            report = evaluate(args.model, [f], args.rope.split(","), clips_per_cell=args.clips,
                              tasks=tuple(args.tasks.split(",")), seed=args.seed,
                              prunings=parse_prunings(args.pruning, not args.skip_unpruned), scene="drifting",
                              log=log)
            name = f"frames-{f}-{args.rope.replace(',', '+')}{'-' + args.tag if args.tag else ''}.json"
            (args.work_dir / name).write_text(json.dumps(report, indent=1))
    reports = [json.loads(path.read_text()) for path in sorted(args.work_dir.glob("frames-*.json"))]
    reports = [json.loads(path.read_text()) for path in args.with_report] + sorted(reports, key=lambda r: r["frames"])
    merged = merge(reports)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "needle_eval.json"
    json_path.write_text(json.dumps(merged, indent=1))
    for path in (json_path, plot_frontier(merged, args.out / "needle_frontier.png", args.tasks.split(","))):
        print("wrote", path)
    return merged


if __name__ == "__main__":
    main()
