"""`intp-vllm eval-needle`: the needle model on 8-128 frame videos, through vLLM with the plugin.

Each cell (frames x RoPE type x task) answers the same held-out clips (fixed seed, needles
at random frames of the whole video). The baseline is what the model could do without
INTP: sample 8 frames uniformly and hope they include the needles. Accuracy comes with
95% Wilson intervals; results (with every clip's answer, for paired comparisons) go to JSON
and a PNG heatmap.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from intp_vllm.core.config import GROUPINGS, ROPE_TYPES
from intp_vllm.research.needle import QUESTIONS, TASKS, TRAIN_FRAMES, make_clips
from intp_vllm.core.rearrange import uniform_frame_indices
from intp_vllm.core.prompt import VIDEO_PROMPT
from intp_vllm.machine import machine_name
from intp_vllm.vllm_ext.engine import shutdown_llm
from intp_vllm.vllm_ext.pruning import VideoPruning

SAMPLING_ROW = "8-frame sampling"


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; it always holds the proportion itself (at 0
    or 1 the bound is exact, not off by rounding)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired answers to the same clips: `only_a` clips
    right under method a alone, `only_b` under b alone (clips both get right or both wrong do
    not count). Under "a and b are equally accurate" the discordant clips split 50:50, so the
    p-value is the binomial tail of the smaller count, doubled (McNemar 1947; exact form as in
    Fagerland et al. 2013)."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


def discordant(answers_a: list[str], answers_b: list[str], clips) -> tuple[int, int]:
    """(clips only a answers right, clips only b does): the two counts `mcnemar_exact` takes."""
    right = [(a == c.answer, b == c.answer) for a, b, c in zip(answers_a, answers_b, clips)]
    return sum(a and not b for a, b in right), sum(b and not a for a, b in right)


def cell_clips(frames: int, task: str, count: int, seed: int, scene: str = "noise"):
    return make_clips(seed * 1_000_003 + frames * 31 + list(QUESTIONS).index(task), count, frames, (task,), scene)


ASK_FRAMES = 8192
"""Frames handed to one `LLM.generate` call at most (whole videos, at least one): vLLM processes
a call's videos before it schedules any, so a cell of 200 videos of 512-1024 frames in one call
held GBs of pixel values at once."""


def _ask(llm, videos: list[np.ndarray], tasks: list[str], pruning: VideoPruning = VideoPruning()) -> list:
    """Each video's answer and its prompt's video token count (after pruning), asked
    ASK_FRAMES frames' worth of videos a call."""
    from vllm import SamplingParams

    kwargs = {"pruning_rate": pruning.rate, "pruning_method": pruning.method}
    requests = [{"prompt": VIDEO_PROMPT.format(question=QUESTIONS[task]), "multi_modal_data": {"video": video},
                 "mm_processor_kwargs": kwargs} for video, task in zip(videos, tasks)]
    per_call = max(1, ASK_FRAMES // max(len(video) for video in videos))
    outputs = [output for start in range(0, len(requests), per_call)
               for output in llm.generate(requests[start:start + per_call],
                                          SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)]
    video_token = llm.llm_engine.model_config.hf_config.video_token_index
    return [(output.outputs[0].text.strip(), output.prompt_token_ids.count(video_token)) for output in outputs]


def _score(asked: list, clips) -> dict:
    answers = [answer for answer, _ in asked]
    correct = sum(answer == clip.answer for answer, clip in zip(answers, clips))
    low, high = wilson_interval(correct, len(clips))
    return {"accuracy": correct / len(clips), "ci95": [low, high], "n": len(clips),
            "video_tokens": float(np.mean([tokens for _, tokens in asked])), "answers": answers}


def method_label(rope_type: str, grouping: str, groupings: list[str],
                 pruning: VideoPruning = VideoPruning()) -> str:
    """A result row: the RoPE type, with the grouping when more than one is compared, and the
    pruning when there is any."""
    label = rope_type if len(groupings) == 1 else f"{rope_type}, {grouping}"
    return f"{label}, {pruning.method} {pruning.rate:g}" if pruning.rate else label


def evaluate(model_dir: str, frames: list[int], rope_types: list[str], factor="auto", clips_per_cell: int = 300,
             tasks: tuple[str, ...] = tuple(TASKS), seed: int = 1234, groupings: tuple[str, ...] = ("interleaved",),
             prunings: tuple[VideoPruning, ...] = (VideoPruning(),), scene: str = "noise",
             engine_kwargs: dict | None = None, log=print) -> dict:
    """Accuracy and video tokens per (task, method, frames) on clips of `scene`; a method is a
    RoPE type (with the grouping, when several are compared, and the pruning, per request), or
    the 8-frame sampling baseline."""
    from vllm import LLM

    for name, values, allowed in (("rope type", rope_types, ROPE_TYPES), ("grouping", groupings, GROUPINGS)):
        unknown = [value for value in values if value not in allowed]
        if unknown:
            raise ValueError(f"{name} {unknown} is not one of {', '.join(allowed)}")
    engine = dict(dtype="float32", max_num_seqs=32,
                  limit_mm_per_prompt={"video": 1}, seed=0)
    engine.update(engine_kwargs or {})
    cells = {(f, t): cell_clips(f, t, clips_per_cell, seed, scene) for f in frames for t in tasks}
    results: dict = {task: {} for task in tasks}
    methods = []
    started = time.perf_counter()
    for index, (grouping, rope_type) in enumerate((g, r) for g in groupings for r in rope_types):
        llm = LLM(model=model_dir, hf_overrides={"intp": {"frames": max(frames), "rope_type": rope_type,
                                                          "factor": factor, "grouping": grouping}}, **engine)
        try:
            for (f, task), clips in cells.items():
                for pruning in prunings:
                    method = method_label(rope_type, grouping, list(groupings), pruning)
                    if method not in methods:
                        methods.append(method)
                    score = _score(_ask(llm, [c.frames for c in clips], [task] * len(clips), pruning), clips)
                    results[task].setdefault(method, {})[str(f)] = score
                    log(f"{method:>8} {task:>5} {f:>4} frames: {score['accuracy']:.3f} "
                        f"({score['video_tokens']:.0f} video tokens)")
                if index == 0:
                    sampled = uniform_frame_indices(f, TRAIN_FRAMES)
                    score = _score(_ask(llm, [c.frames[sampled] for c in clips], [task] * len(clips)), clips)
                    caught = ""
                    if task in TASKS:
                        score["needles_caught"] = float(np.mean([set(c.needle_frames) <= set(sampled.tolist())
                                                                 for c in clips]))
                        caught = f" (needles caught {score['needles_caught']:.2f})"
                    results[task].setdefault(SAMPLING_ROW, {})[str(f)] = score
                    log(f"{SAMPLING_ROW} {task:>5} {f:>4} frames: {score['accuracy']:.3f}{caught}")
        finally:
            shutdown_llm(llm)
    report = {"model": str(model_dir), "machine": machine_name(), "factor": factor, "groupings": list(groupings),
              "prunings": [asdict(p) for p in prunings], "scene": scene,
              "frames": frames, "rope_types": rope_types, "methods": methods, "clips_per_cell": clips_per_cell,
              "seed": seed, "seconds": round(time.perf_counter() - started, 1), "results": results}
    if len(groupings) == 2:
        report["grouping_comparison"] = compare_groupings(report, cells)
    return report


def compare_groupings(report: dict, cells: dict) -> list[dict]:
    """The two groupings of a report on the same clips, per task, frame count, RoPE type and
    pruning: accuracies, the clips only one of them gets right, and the exact McNemar p-value of
    that split (`cells`: (frames, task) -> the clips asked)."""
    first, second = report["groupings"]
    rows = []
    for (frames, task), clips in cells.items():
        for rope in report["rope_types"]:
            for pruning in report["prunings"]:
                cells_of = [report["results"][task][method_label(rope, g, report["groupings"],
                                                                 VideoPruning(**pruning))][str(frames)]
                            for g in (first, second)]
                only = discordant(cells_of[0]["answers"], cells_of[1]["answers"], clips)
                rows.append({"task": task, "frames": frames, "rope": rope, "pruning": pruning,
                             first: cells_of[0]["accuracy"], second: cells_of[1]["accuracy"],
                             f"only_{first}_right": only[0], f"only_{second}_right": only[1],
                             "mcnemar_p": mcnemar_exact(*only)})
    return rows


def plot_heatmap(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["results"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [SAMPLING_ROW] + report["methods"]
        grid = np.array([[report["results"][task][row][str(f)]["accuracy"] for f in report["frames"]]
                         for row in rows])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(report["frames"])), [str(f) for f in report["frames"]])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("frames in the video")
        ax.set_title(f"{task}: {QUESTIONS[task]}")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.suptitle(f"needle accuracy, n={report['clips_per_cell']} per cell ({report['machine']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(report: dict, path: Path) -> Path:
    """Accuracy (95% interval) against video tokens per request, per task: one line per method
    through its frame counts, 8-frame sampling as the reference point. Where pruning buys
    frames for fewer tokens and where it costs accuracy, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["results"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in [SAMPLING_ROW] + report["methods"]:
            cells = [report["results"][task][row][str(f)] for f in report["frames"]]
            x = [cell["video_tokens"] for cell in cells]
            y = [cell["accuracy"] for cell in cells]
            err = [[max(0.0, a - cell["ci95"][0]) for a, cell in zip(y, cells)],
                   [max(0.0, cell["ci95"][1] - a) for a, cell in zip(y, cells)]]  # Wilson bounds round near 0, 1
            ax.errorbar(x, y, yerr=err, marker="o" if row != SAMPLING_ROW else "s", capsize=2, label=row,
                        linestyle="--" if row == SAMPLING_ROW else "-")
            for f, xi, yi in zip(report["frames"], x, y):
                ax.annotate(str(f), (xi, yi), textcoords="offset points", xytext=(3, -10), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("video tokens per request (labels: frames in the video)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}: {QUESTIONS[task]} ({report['scene']} scene)")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"needle accuracy against tokens, n={report['clips_per_cell']} per cell ({report['machine']})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, output_dir: Path) -> tuple[Path, ...]:
    """needle_eval.json and .png, and needle_frontier.png when the report has pruned rows."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "needle_eval.json"
    json_path.write_text(json.dumps(report, indent=2))
    paths = (json_path, plot_heatmap(report, output_dir / "needle_eval.png"))
    if any(p["rate"] for p in report.get("prunings", ())):
        paths += (plot_frontier(report, output_dir / "needle_frontier.png"),)
    return paths
