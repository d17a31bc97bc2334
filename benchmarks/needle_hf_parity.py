"""The needle eval through HF transformers: does the plugin score what HF scores on each cell?

Reads an `intp-vllm eval-needle` report and answers every cell's held-out clips again with
HF transformers (`hf_video_llava.py`: frames in the same groups), the LM given the same RoPE
at the same scale the plugin used for those clips (with factor "auto", the log-quantised
per-request scale of request_scale.py) and the same numpy preprocessing. The 8-frame
sampling row is answered from the same 8 frames. Both answer the same clips, so the
comparison is paired: per cell it writes both accuracies with their 95% Wilson intervals,
the share of clips answered identically, the clips only one of them got right, and the
exact McNemar p-value of those; a cell agrees when p >= 0.05. For a report comparing two
groupings it also writes, per cell, how many clips HF answers differently under the two
groupings (a paired comparison the accuracies hide).

    python benchmarks/needle_hf_parity.py --report benchmarks/results/needle/needle_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from intp_vllm.research.needle import NeedleClip, TRAIN_FRAMES, build_tokenizer, predictions, prompt_ids
from intp_vllm.machine import machine_name
from intp_vllm.research.needle_eval import (SAMPLING_ROW, cell_clips, discordant, mcnemar_exact, method_label,
                                         wilson_interval)
from intp_vllm.core.config import tokens_per_frame
from intp_vllm.core.rearrange import uniform_frame_indices


def report_groupings(report: dict) -> list[str]:
    """The groupings a report compares (reports before groupings were compared name one)."""
    return report.get("groupings") or [report["grouping"]]


def report_methods(report: dict) -> list[tuple[str, str, str]]:
    """(row label, rope type, grouping) of each row of the report, in the order eval-needle ran them."""
    groupings = report_groupings(report)
    return [(method_label(rope, grouping, groupings), rope, grouping)
            for grouping in groupings for rope in report["rope_types"]]


def request_scale(report: dict, prompt_tokens: int, trained_context: int) -> float:
    """The RoPE scale the plugin gave a prompt of this length."""
    from intp_vllm.core.request_scale import code_scale, request_scale_code

    if report["factor"] == "auto":
        return code_scale(request_scale_code(prompt_tokens, trained_context))
    return float(report["factor"])


def load_reference(model_dir: str, rope_type: str, scale: float, frames: int, grouping: str):
    """The HF model in float32 with the plugin's RoPE at `scale` and its frame grouping."""
    import torch
    from transformers import AutoConfig

    from intp_vllm.research.hf_video_llava import hf_model_class
    from intp_vllm.core.config import rope_geometry
    from intp_vllm.core.rope_scaling import hf_rope_parameters

    config = AutoConfig.from_pretrained(model_dir)
    text = config.text_config
    _, rotary_dim = rope_geometry(text)
    base = text.rope_parameters["rope_theta"]
    trained_context = text.max_position_embeddings
    text.rope_parameters = hf_rope_parameters(rope_type, base=base, rotary_dim=rotary_dim, factor=scale,
                                              original_max_position=trained_context)
    text.max_position_embeddings = max(trained_context, 1 << 15)
    config.intp = {"frames": max(frames, TRAIN_FRAMES), "grouping": grouping}
    return hf_model_class(config).from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def parity(report: dict, model_dir: str | None = None, log=print) -> dict:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = model_dir or report["model"]
    tokenizer = build_tokenizer()
    config = AutoConfig.from_pretrained(model_dir)
    per_frame = tokens_per_frame(config.vision_config.image_size, config.vision_config.patch_size)
    trained_context = config.text_config.max_position_embeddings
    methods = report_methods(report)
    rows, answers_by_method, started = [], {}, time.perf_counter()
    for task in report["results"]:
        for frames in report["frames"]:
            clips = cell_clips(frames, task, report["clips_per_cell"], report["seed"])
            sampled = uniform_frame_indices(frames, TRAIN_FRAMES)
            cells = [(label, rope, grouping, clips) for label, rope, grouping in methods]
            # eval-needle asked the sampling baseline through its first engine
            cells.append((SAMPLING_ROW, *methods[0][1:],
                          [NeedleClip(c.frames[sampled], c.task, c.answer, c.needle_frames) for c in clips]))
            for label, rope, grouping, cell in cells:
                prompt_tokens = len(prompt_ids(tokenizer, task, len(cell[0].frames) * per_frame))
                scale = request_scale(report, prompt_tokens, trained_context)
                model = load_reference(model_dir, rope, scale, len(cell[0].frames), grouping)
                answers = predictions(model, tokenizer, cell, batch_size=16)
                answers_by_method[(task, frames, label)] = answers
                plugin = report["results"][task][label][str(frames)]
                row = {"task": task, "frames": frames, "method": label, "scale": round(scale, 4),
                       **paired_comparison(plugin, tokenizer.convert_ids_to_tokens(answers.tolist()), cell)}
                rows.append(row)
                log(f"{task:>5} {frames:>4} {label:>18}: plugin {row['plugin']:.3f}  HF {row['hf']:.3f}  same answer "
                    f"{row['same_answer']:.3f}  McNemar p {row['mcnemar_p']:.3f}  {'agree' if row['agree'] else 'DIFFER'}")
    result = {"report": report.get("source"), "model": str(model_dir), "machine": machine_name(),
              "seconds": round(time.perf_counter() - started, 1),
              "cells_agreeing": sum(r["agree"] for r in rows), "cells": len(rows),
              "largest_difference": max(abs(r["plugin"] - r["hf"]) for r in rows), "rows": rows}
    groupings = report_groupings(report)
    if len(groupings) == 2:
        result["groupings_answer_differently"] = grouping_disagreement(answers_by_method, report, groupings)
    return result


def paired_comparison(plugin: dict, hf_answers: list[str], clips) -> dict:
    """The plugin's and HF's answers to the same clips, side by side: accuracies (95% Wilson),
    the share answered identically, the discordant clips and their exact McNemar p-value.
    Raises ValueError for a report without per-clip answers (made before they were kept)."""
    if "answers" not in plugin:
        raise ValueError("the report has no per-clip answers: re-run intp-vllm eval-needle to make one")
    plugin_right = sum(a == c.answer for a, c in zip(plugin["answers"], clips))
    hf_right = sum(a == c.answer for a, c in zip(hf_answers, clips))
    only_plugin, only_hf = discordant(plugin["answers"], hf_answers, clips)
    p_value = mcnemar_exact(only_plugin, only_hf)
    n = len(clips)
    return {"n": n, "plugin": plugin_right / n, "plugin_ci95": list(wilson_interval(plugin_right, n)),
            "hf": hf_right / n, "hf_ci95": list(wilson_interval(hf_right, n)),
            "same_answer": sum(a == b for a, b in zip(plugin["answers"], hf_answers)) / n,
            "only_plugin_right": only_plugin, "only_hf_right": only_hf, "mcnemar_p": p_value,
            "agree": p_value >= 0.05}


def grouping_disagreement(answers_by_method: dict, report: dict, groupings: list[str]) -> list[dict]:
    """Per task, frame count and RoPE type: the fraction of clips whose HF answer changes with the grouping."""
    rows = []
    for task in report["results"]:
        for frames in report["frames"]:
            for rope in report["rope_types"]:
                first, second = (answers_by_method[(task, frames, method_label(rope, g, groupings))]
                                 for g in groupings)
                rows.append({"task": task, "frames": frames, "rope": rope,
                             "fraction": float((first != second).float().mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="needle_eval.json from intp-vllm eval-needle")
    parser.add_argument("--model", help="checkpoint directory (default: the one named in the report)")
    parser.add_argument("--out", type=Path, help="output JSON (default: needle_hf_parity.json next to the report)")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    report["source"] = str(args.report)
    result = parity(report, args.model)
    out = args.out or args.report.with_name("needle_hf_parity.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['cells_agreeing']}/{result['cells']} cells agree; wrote {out}")


if __name__ == "__main__":
    main()
