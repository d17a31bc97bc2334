"""The torch reference's rotary keywords as the Triton kernel takes them."""

from __future__ import annotations

from intp_vllm.core.rope_scaling import yarn_ramp_bounds


def for_kernel(kw: dict) -> dict:
    """`kw` of `apply_scaled_rotary` with `original_max_position` replaced by YaRN's ramp bounds:
    the kernel takes plain numbers and imports nothing from the package."""
    kernel = {key: value for key, value in kw.items() if key != "original_max_position"}
    kernel["yarn_ramp"] = yarn_ramp_bounds(base=kw["base"], rotary_dim=kw["rotary_dim"],
                                           original_max_position=kw["original_max_position"])
    return kernel
