"""lmms-eval task functions for the needle clips that `benchmarks/lmms_eval_needle.py` writes.

Runs inside lmms-eval's own environment (lmms-eval, PyAV, Pillow), never the product's. Each
document is {"video": lossless file, "question", "answer"}. Two ways to hand lmms-eval the video:
- `intp_needle` (frames): the video's frames, decoded here with PyAV, as PIL images; lmms-eval's
  openai backend sends them as N image_url parts of one message (PNG), as it sends any video by
  default. (lmms-eval decodes videos itself through qwen_vl_utils, which needs torchvision, and
  PyPI's torchvision cannot load against a CPU torch; the frames are the same either way.)
- `intp_needle_video_url`: the file's path; with `pass_video_url=True` lmms-eval sends it as one
  file:// video_url, decoded by the server.
"""

from __future__ import annotations


def doc_to_frames(doc) -> list:
    import av

    with av.open(doc["video"]) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def doc_to_video_path(doc) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict:
    """Exact match of the first word of the answer with the clip's colour."""
    words = results[0].strip().split()
    return {"accuracy": float(bool(words) and words[0] == doc["answer"])}
