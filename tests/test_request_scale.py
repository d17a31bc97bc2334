"""Per-request scale codes carried in positions: round trip, rounding up, the int32 bound."""

from __future__ import annotations

import pytest
import torch

from intp_vllm.core.request_scale import (
    MAX_POSITION,
    MAX_SCALE,
    code_scale,
    decode_positions,
    encode_positions,
    join_cache_salts,
    position_offset,
    request_scale_code,
    scale_cache_salt,
    scale_code,
)


@pytest.mark.parametrize("scale", [1.0, 1.0001, 1.5, 2.0, 3.7, 8.0, 31.9, 100.0])
def test_code_gives_at_least_the_scale_and_barely_more(scale):
    code = scale_code(scale)
    assert scale <= code_scale(code) <= scale * 1.003
    if code:
        assert code_scale(code - 1) < scale


def test_scale_one_is_code_zero():
    assert scale_code(1.0) == 0 and code_scale(0) == 1.0


def test_prompt_that_fits_runs_unscaled_and_longer_ones_scale_up():
    assert request_scale_code(4096, 4096) == 0
    assert code_scale(request_scale_code(4097, 4096)) >= 4097 / 4096
    assert 4.0 <= code_scale(request_scale_code(16384, 4096)) < 4.02


def test_positions_round_trip_and_decode_continues_at_the_same_scale():
    code = scale_code(6.3)
    prompt = encode_positions(100, code)
    plain, codes = decode_positions(prompt)
    assert plain.tolist() == list(range(100)) and set(codes.tolist()) == {code}
    decode_step = torch.tensor([position_offset(code) + 100])  # vLLM: delta + context_len
    plain, codes = decode_positions(decode_step)
    assert plain.tolist() == [100] and codes.tolist() == [code]


def test_every_encoded_position_fits_int32():
    biggest = encode_positions(1, scale_code(MAX_SCALE))[0] + MAX_POSITION - 1
    assert biggest < 2**31


def test_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"RoPE scale must be within \[1, 255.3\], got 300.000"):
        scale_code(300.0)
    with pytest.raises(ValueError, match="exceeds the 1048576-position limit"):
        request_scale_code(MAX_POSITION, 4096)


def test_client_salts_are_joined_to_the_scale_and_cannot_name_another():
    assert scale_cache_salt(0) is None and scale_cache_salt(5) == "intp-rope-scale-5"
    assert join_cache_salts(None, None) is None
    assert join_cache_salts(None, "intp-rope-scale-5") == "intp-rope-scale-5"
    assert join_cache_salts("tenant", "intp-rope-scale-5") == "tenant+intp-rope-scale-5"
    assert join_cache_salts("tenant", None) == "tenant+intp-rope-scale-0"
    # a client that names scale 5 (or another client's joined salt) at scale 1 or 15 gets another salt
    for forged in ("intp-rope-scale-5", "tenant+intp-rope-scale-5"):
        for scale_salt in (None, "intp-rope-scale-15"):
            assert join_cache_salts(forged, scale_salt) not in ("intp-rope-scale-5", "tenant+intp-rope-scale-5")
