"""lmms-eval against `intp-vllm serve` on a local video-QA task: the needle clips, scored by both.

`make eval` runs this (with the product's `.venv`; lmms-eval runs from its own `.venv-lmms-eval`,
pinned in `benchmarks/lmms_eval/requirements.txt`, and only reaches the server over HTTP). It
1. writes held-out needle clips (`research.needle_eval.cell_clips`: the clips `eval-needle` asks
   about) as lossless FFV1 videos, checked to decode to the very same frames, and a JSONL of
   {video, question, answer}, with two lmms-eval task definitions reading it
   (`benchmarks/lmms_eval/intp_needle/utils.py`);
2. scores the same clips with `eval-needle`'s own code (`needle_eval.evaluate`, through vLLM);
3. starts `intp-vllm serve` on the needle model (no memory flag) and runs lmms-eval's `openai`
   backend against it twice: the video as its frames, N image_url parts (lmms-eval's default
   way), and with `pass_video_url=True`, one file:// video_url;
4. compares, per task and mode, lmms-eval's accuracy with eval-needle's (95% Wilson intervals)
   and, clip by clip, their answers (exact McNemar), and writes JSON and a markdown table.
Nothing is downloaded: lmms-eval runs with the Hugging Face hub offline.

    python benchmarks/lmms_eval_needle.py [--clips 100] [--frames 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "benchmarks" / "lmms_eval" / "intp_needle"
MODES = {"frames": ("intp_needle", {}), "video_url": ("intp_needle_video_url", {"pass_video_url": "True"})}
"""mode -> (lmms-eval task, extra model_args)."""
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.{visual}
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""


def write_task(clips_by_task: dict, work: Path) -> tuple[Path, list[str]]:
    """Lossless videos, the JSONL and the task folder under `work`; returns the task folder and
    each row's id ("<task>-<clip>"; lmms-eval's doc_id is the row's index). Raises
    AssertionError if a video does not decode to its clip's frames."""
    import av
    import numpy as np

    from intp_vllm.research.needle import TASKS
    from intp_vllm.video.io import write_video

    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for task, clips in clips_by_task.items():
        for i, clip in enumerate(clips):
            path = write_video(videos / f"{task}-{i:04d}.mkv", clip.frames)
            with av.open(str(path)) as container:
                decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            assert np.array_equal(decoded, clip.frames), f"{path} does not decode to its frames"
            rows.append({"id": f"{task}-{i}", "task": task, "video": str(path), "question": TASKS[task],
                         "answer": clip.answer})
    data = work / "needle.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    shutil.copy(TASK_DIR / "utils.py", tasks / "utils.py")
    for task, visual in (("intp_needle", "doc_to_frames"), ("intp_needle_video_url", "doc_to_video_path")):
        (tasks / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data, visual=visual))
    return tasks, [row["id"] for row in rows]


def run_lmms_eval(python: Path, base_url: str, model: str, frames: int, mode: str, tasks: Path, ids: list[str],
                  out: Path, log) -> dict:
    """One lmms-eval run; {row id: answer} from its logged samples."""
    task, extra = MODES[mode]
    model_args = {"model_version": model, "base_url": f"{base_url}/v1", "api_key": "none",
                  "max_frames_num": str(frames), "num_concurrent": "8", **extra}
    command = [str(python), "-m", "lmms_eval", "--model", "openai",
               "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
               "--tasks", task, "--include_path", str(tasks), "--batch_size", "1",
               "--log_samples", "--output_path", str(out / mode)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log(" ".join(command))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    samples = sorted((out / mode).rglob(f"*samples_{task}.jsonl"))
    if not samples:
        raise SystemExit(f"lmms-eval wrote no samples for {task} under {out / mode}")
    answers = {}
    for line in samples[-1].read_text().splitlines():
        sample = json.loads(line)
        response = sample.get("filtered_resps") or sample.get("resps")
        while isinstance(response, list):
            response = response[0] if response else ""
        words = str(response).strip().split()
        answers[ids[sample["doc_id"]]] = words[0] if words else ""
    return {"answers": answers, "seconds": round(time.perf_counter() - started, 1), "command": command}


def compare(clips_by_task: dict, needle_report: dict, runs: dict) -> dict:
    from intp_vllm.research.needle_eval import mcnemar_exact, wilson_interval

    rows = {}
    for task, clips in clips_by_task.items():
        ours = needle_report["results"][task]["yarn"][str(needle_report["frames"][0])]
        right_ours = [a == c.answer for a, c in zip(ours["answers"], clips)]
        rows[task] = {"eval_needle": {"accuracy": ours["accuracy"], "ci95": ours["ci95"], "n": ours["n"]}}
        for mode, run in runs.items():
            answers = [run["answers"].get(f"{task}-{i}") for i in range(len(clips))]
            right = [a == c.answer for a, c in zip(answers, clips)]
            correct = sum(right)
            low, high = wilson_interval(correct, len(clips))
            only_lmms = sum(r and not o for r, o in zip(right, right_ours))
            only_ours = sum(o and not r for r, o in zip(right, right_ours))
            rows[task][mode] = {
                "accuracy": correct / len(clips), "ci95": [low, high], "n": len(clips),
                "missing": sum(a is None for a in answers),
                "same_answer": sum(a == b for a, b in zip(answers, ours["answers"])) / len(clips),
                "mcnemar_p": mcnemar_exact(only_lmms, only_ours),
                "within_interval": low <= ours["accuracy"] <= high and ours["ci95"][0] <= correct / len(clips)
                <= ours["ci95"][1],
            }
    return rows


def markdown(report: dict) -> str:
    lines = [f"lmms-eval {report['lmms_eval']} against `intp-vllm serve` ({report['model']}, {report['frames']} "
             f"frames, n = {report['clips']} per task, {report['machine']['name']})", "",
             "| task | eval-needle | lmms-eval, frames as image_url | lmms-eval, pass_video_url |",
             "| --- | --- | --- | --- |"]
    for task, row in report["rows"].items():
        cells = [row["eval_needle"]] + [row[mode] for mode in MODES]
        text = [f"{c['accuracy']:.3f} [{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}]" for c in cells]
        text[1:] = [f"{t}, same answer {row[m]['same_answer']:.2f}" for t, m in zip(text[1:], MODES)]
        lines.append(f"| {task} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "needle-video-llava")
    parser.add_argument("--clips", type=int, default=100, help="held-out clips per task")
    parser.add_argument("--frames", type=int, default=32, help="frames of each clip; the server's --frames")
    parser.add_argument("--seed", type=int, default=1234, help="eval-needle's clip seed")
    parser.add_argument("--lmms-python", type=Path, default=ROOT / ".venv-lmms-eval" / "bin" / "python",
                        help="python of lmms-eval's environment (made by `make eval`)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "lmms-eval",
                        help="videos, dataset, task definitions and lmms-eval's own output")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lmms_eval")
    args = parser.parse_args(argv)
    if not args.lmms_python.exists():
        parser.error(f"--lmms-python {args.lmms_python} does not exist: run `make eval`, which creates it")

    from intp_vllm.machine import machine
    from intp_vllm.research.needle import TASKS
    from intp_vllm.research.needle_eval import cell_clips, evaluate
    from intp_vllm_benchmarks.load_test import serve, served_model

    def log(message: str) -> None:
        print(f"[lmms-eval-needle] {message}", flush=True)

    work = args.work_dir.resolve()
    clips_by_task = {task: cell_clips(args.frames, task, args.clips, args.seed) for task in TASKS}
    tasks, ids = write_task(clips_by_task, work)
    log(f"wrote {2 * args.clips} lossless clips and the task definitions under {work}")
    needle_report = evaluate(str(args.model), [args.frames], ["yarn"], clips_per_cell=args.clips, seed=args.seed,
                             log=lambda line: log(f"eval-needle: {line}"))
    # pass_video_url sends media_io_kwargs.video.num_frames, which vLLM takes only from trusted clients
    server_args = ["--dtype", "float32", "--frames", str(args.frames), "--max-num-seqs", "16",
                   "--allowed-local-media-path", str(work), "--trust-request-mm-kwargs"]
    runs = {}
    with serve(args.model, server_args) as base_url:
        model = served_model(base_url)
        for mode in MODES:
            runs[mode] = run_lmms_eval(args.lmms_python, base_url, model, args.frames, mode, tasks, ids,
                                       work / "output", log)
            log(f"{mode}: {runs[mode]['seconds']} s")
    version = subprocess.run([str(args.lmms_python), "-c", "import importlib.metadata as m; "
                              "print(m.version('lmms_eval'))"], capture_output=True, text=True).stdout.strip()
    report = {"benchmark": "lmms_eval_needle", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT)
                                                 else args.model),
              "lmms_eval": version, "frames": args.frames, "clips": args.clips, "seed": args.seed,
              "commands": {mode: run["command"] for mode, run in runs.items()},
              "seconds": {mode: run["seconds"] for mode, run in runs.items()},
              "rows": compare(clips_by_task, needle_report, runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lmms_eval_needle.json").write_text(json.dumps(report, indent=1))
    (args.out / "lmms_eval_needle.md").write_text(markdown(report))
    print(markdown(report))
    failed = [f"{task}/{mode}" for task, row in report["rows"].items() for mode in MODES
              if not row[mode]["within_interval"] or row[mode]["missing"]]
    if failed:
        sys.exit(f"lmms-eval and eval-needle disagree beyond the interval (or answers are missing): {failed}")
    return report


if __name__ == "__main__":
    main()
