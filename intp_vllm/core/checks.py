"""Input checks shared by every layer, with one wording for their errors."""

from __future__ import annotations

import numbers
import re


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError("<name> must be a positive integer, got <value>") unless `value` is an
    int (numpy integers included, bools not) >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


PILLOW = "pillow"
"""The exact preprocessing path (Pillow, bit-exact with HF); any other `preprocess_device` is a
torch device (video/preprocess.py)."""
PREPROCESS_DEVICES = f'"{PILLOW}" (exact, the default), "cpu", "cuda" or "cuda:N"'


def check_preprocess_device(name: str, value: object) -> None:
    """Raise ValueError naming `name` unless `value` is "pillow", "cpu", "cuda" or "cuda:N" with
    N a CUDA device this host has (a CUDA name on a host without CUDA is refused here, when the
    setting is read, not at a first frame)."""
    if value == PILLOW or value == "cpu":
        return
    if not isinstance(value, str) or not re.fullmatch(r"cuda(:\d+)?", value):
        raise ValueError(f"{name} must be {PREPROCESS_DEVICES}, got {value!r}")
    import torch

    count = torch.cuda.device_count()  # through NVML: unlike is_available(), it leaves the process safe to fork
    index = int(value.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(f"{name} {value!r} names a CUDA device this host does not have "
                         f"({count} CUDA device(s) visible to torch); use {PREPROCESS_DEVICES}")
