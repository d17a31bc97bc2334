"""A run's summary (rates, TTFT, FLOPs, MFU), the goals, and the report's table, plot and JSON."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from intp_vllm.apps.bench.flops import ModelShape, request_flops
from intp_vllm.apps.bench.runners import Run


def summarize_round(records: list[dict], seconds: float, shape: ModelShape, peak_flops: float,
                    kv_bytes_per_token: int) -> dict:
    """Rates, TTFT and model FLOPs of one timed round; MFU and each rate's ceiling at 100% MFU;
    the KV cache a request holds at its end (its prompt and output tokens), mean over the round."""
    frames = [r["frames"] for r in records]
    flops = {stage: 0 for stage in ("vision", "projector", "prefill", "decode")}
    for record, count in zip(records, frames):
        for stage, value in request_flops(shape, count, record["prompt_tokens"], record["output_tokens"]).items():
            flops[stage] += value
    total = sum(flops.values())
    mfu = total / seconds / peak_flops
    rates = {
        "req_per_s": len(records) / seconds,
        "frames_per_s": sum(frames) / seconds,
        "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in records) / seconds,
        "output_tokens_per_s": sum(r["output_tokens"] for r in records) / seconds,
    }
    ttft = sorted(r["ttft_s"] for r in records)
    return {
        "seconds": seconds,
        **rates,
        "ceiling_at_100pct_mfu": {name: value / mfu for name, value in rates.items()},
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_max_s": ttft[-1],
        "frames": sum(frames),
        "video_tokens": sum(r["video_tokens"] for r in records),
        "kv_bytes_per_request": kv_bytes_per_token * statistics.fmean(r["prompt_tokens"] + r["output_tokens"]
                                                                      for r in records),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "output_tokens": sum(r["output_tokens"] for r in records),
        "flops": {**flops, "total": total},
        "achieved_flops_per_s": total / seconds,
        "mfu": mfu,
    }


def summarize_run(run: Run, result: dict, shape: ModelShape, peak_flops: float, kv_bytes_per_token: int) -> dict:
    """The fastest timed round (the first round is warm-up and is dropped): on a shared machine
    other load only ever adds time, so the fastest round is the least disturbed one."""
    fastest = min(result["rounds"][1:], key=lambda r: r["seconds"])
    return {
        "label": run.label,
        "engine": run.engine,
        "frames_read": run.frames,
        "intp": run.intp,
        "pruning": asdict(run.pruning) if run.pruning else None,
        **summarize_round(fastest["requests"], fastest["seconds"], shape, peak_flops, kv_bytes_per_token),
        "round_seconds": [r["seconds"] for r in result["rounds"][1:]],
        "startup_s": result["startup_s"],
        "peak_rss_mib": result["peak_rss_mib"],
        "peak_pss_mib": result["peak_pss_mib"],
    }


def goals(summaries: dict, runs: list[Run]) -> dict:
    """The targets: the plugin in <= 0.5x HF's time; INTP <= 5% over the same tokens without it
    (the worst of its frame counts, each in `by_frames`); with a pruned run, its req/s >= 2x
    INTP's unpruned at the same frames."""
    by_role = {}
    for run in runs:
        by_role.setdefault(run.role, []).append(run)
    (hf,), (plugin,) = by_role["hf"], by_role["plugin"]
    time_ratio = summaries[plugin.name]["seconds"] / summaries[hf.name]["seconds"]
    intp_runs = {run.frames: run.name for run in by_role["intp"]}
    overheads = {run.frames: summaries[intp_runs[run.frames]]["seconds"] / summaries[run.name]["seconds"] - 1
                 for run in by_role["unscaled"]}
    overhead = max(overheads.values())
    result = {
        "plugin_vs_hf_time_ratio": {"value": time_ratio, "goal": "<= 0.5", "met": time_ratio <= 0.5},
        "intp_overhead": {"value": overhead, "goal": "<= 0.05", "met": overhead <= 0.05,
                          "note": "INTP's time over the same frames with rope 'none', factor 1, consecutive groups"},
    }
    if len(overheads) > 1:
        result["intp_overhead"]["by_frames"] = overheads
        result["intp_overhead"]["note"] += "; the worst of the frame counts"
    for pruned in by_role.get("pruned", ()):
        unpruned = intp_runs[pruned.frames]
        speedup = summaries[pruned.name]["req_per_s"] / summaries[unpruned]["req_per_s"]
        result["pruning_speedup"] = {"value": speedup, "goal": ">= 2", "met": speedup >= 2,
                                     "note": f"{pruned.name} req/s over {unpruned}'s (the same frames, unpruned)"}
    return result


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = list(runs)
    labels = [runs[n]["label"].replace(", ", "\n") for n in names]
    palette = ["#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    colours = [palette[i % len(palette)] for i in range(len(names))]
    panels = [
        ("requests / s", lambda r: r["req_per_s"]),
        ("video frames / s (through the encoder)", lambda r: r["frames_per_s"]),
        ("prompt tokens / s", lambda r: r["prompt_tokens_per_s"]),
        ("output tokens / s", lambda r: r["output_tokens_per_s"]),
        ("mean TTFT (s)", lambda r: r["ttft_mean_s"]),
        ("KV cache per request (MiB)", lambda r: r["kv_bytes_per_request"] / 2**20),
        ("peak RSS of the process tree (MiB)", lambda r: r["peak_rss_mib"]),
        ("MFU (% of measured matmul peak)", lambda r: 100 * r["mfu"]),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(15, 10.5))
    for ax, (title, value) in zip(axes.flat, panels):
        values = [value(runs[n]) for n in names]
        ax.bar(range(len(names)), values, color=colours)
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax = axes.flat[-1]
    ax.axis("off")
    notes = [
        f"model: {report['model_name']}",
        f"{report['model_shape']['tokens_per_frame']} tokens a frame",
        f"{report['settings']['requests']} requests, videos of {report['settings']['frames']} frames,",
        f"{report['settings']['new_tokens']} new tokens",
        f"matmul peak: {report['peak_flops'] / 1e9:.1f} GFLOP/s ({report['dtype']})",
        f"vLLM compiled: {not report['settings']['enforce_eager']}",
        "env: " + (" ".join(f"{k}={v}" for k, v in report["machine"]["env"].items()) or "defaults"),
    ]
    if "goals" in report:
        g = report["goals"]
        notes += [f"plugin / HF time: {g['plugin_vs_hf_time_ratio']['value']:.2f} (goal <= 0.5)",
                  f"INTP overhead: {100 * g['intp_overhead']['value']:+.1f}% (goal <= 5%)"]
        if "pruning_speedup" in g:
            notes.append(f"pruned / unpruned req/s: {g['pruning_speedup']['value']:.2f} (goal >= 2)")
    ax.text(0, 0.95, "\n".join(notes), va="top", fontsize=8, family="monospace")
    fig.suptitle(f"{report.get('model_type', 'Video-LLaVA')} offline throughput - {report['machine']['name']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(report: dict) -> str:
    width = max(16, *(len(name) for name in report["runs"]))
    header = (f"{'run':<{width}} {'s':>7} {'req/s':>7} {'frames/s':>9} {'prompt t/s':>11} {'out t/s':>8} "
              f"{'TTFT s':>7} {'KV MiB/req':>10} {'RSS MiB':>8} {'GFLOP/s':>8} {'MFU':>6}")
    lines = [header]
    for name, r in report["runs"].items():
        lines.append(f"{name:<{width}} {r['seconds']:7.2f} {r['req_per_s']:7.3f} {r['frames_per_s']:9.1f} "
                     f"{r['prompt_tokens_per_s']:11.0f} {r['output_tokens_per_s']:8.1f} {r['ttft_mean_s']:7.2f} "
                     f"{r['kv_bytes_per_request'] / 2**20:10.1f} {r['peak_rss_mib']:8.0f} "
                     f"{r['achieved_flops_per_s'] / 1e9:8.1f} {100 * r['mfu']:5.1f}%")
    return "\n".join(lines)


def write_report(report: dict, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "throughput.json"
    json_path.write_text(json.dumps(report, indent=2))
    return [json_path, plot(report, output_dir / "throughput.png")]
