"""Input checks shared by every layer, with one wording for their errors."""

from __future__ import annotations

import numbers


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError("<name> must be a positive integer, got <value>") unless `value` is an
    int (numpy integers included, bools not) >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
