"""Does the speed task need the encoder's temporal window? The same recipe, with and without it.

Trains the needle model's recipe (`research.needle.train_needle`, same seed, batches and
schedule) on the speed task (`make_motion_clip`: one smooth texture sliding 7 or 28 px over
the clip; no single frame tells the answer) twice: with temporal attention over the tower's
8-frame window, and with the stock per-frame tower, which leaves comparing frames to the
language model. Records each one's held-out 8-frame accuracy every `--eval-every` steps until
it reaches `--target` or `--max-steps`, and writes JSON and a PNG of the two learning curves.

    python benchmarks/motion_window.py [--max-steps 1200] [--out benchmarks/results/motion]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"temporal attention": True, "per-frame tower": False}


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in report["runs"].items():
        ax.plot([h["step"] for h in run["history"]], [h["speed"] for h in run["history"]], marker="o", ms=3,
                label=f"{name} ({run['steps']} steps, {run['seconds']:.0f} s)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("training step (batches of 32 clips)")
    ax.set_ylabel("held-out 8-frame accuracy")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"speed task: {report['question']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(report["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    from intp_vllm.machine import machine_name
    from intp_vllm.research.needle import QUESTIONS, TrainConfig, train_needle

    defaults = TrainConfig(tasks=("speed",))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--target", type=float, default=defaults.target_accuracy)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motion")
    args = parser.parse_args(argv)
    config = replace(defaults, max_steps=args.max_steps, eval_every=args.eval_every, target_accuracy=args.target,
                     seed=args.seed)
    runs = {}
    for name, temporal in VARIANTS.items():
        with tempfile.TemporaryDirectory(prefix="motion-window-") as tmp:
            trained = train_needle(tmp, replace(config, temporal_attention=temporal),
                                   log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        runs[name] = {"steps": trained["steps"], "seconds": trained["seconds"],
                      "accuracy_8_frames": trained["accuracy_8_frames"]["speed"], "history": trained["history"]}
    report = {"benchmark": "motion_window", "machine": machine_name(), "question": QUESTIONS["speed"],
              "config": {"max_steps": args.max_steps, "eval_every": args.eval_every, "target": args.target,
                         "seed": args.seed}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "motion_window.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "motion_window.png")
    for name, run in runs.items():
        reached = next((h["step"] for h in run["history"] if h["speed"] >= 0.9), None)
        print(f"{name}: {run['accuracy_8_frames']:.3f} after {run['steps']} steps; >= 0.9 from step {reached}")
    return report


if __name__ == "__main__":
    main()
