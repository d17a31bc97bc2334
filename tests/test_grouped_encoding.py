"""INTP grouped encoding: exact for a per-frame tower, exactly as computed by hand for a windowed one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hf_reference import load_hf_model
from intp_vllm.core.grouped_encoding import encode_in_groups

N = 8


class WindowTemporalEncoder(nn.Module):
    """Patch tokens per frame, then attention across the N frames of a clip at each token.

    Like LanguageBind's video tower: a temporal embedding of fixed size N, so it only
    takes N-frame clips, and each frame's tokens depend on the other frames in its clip.
    """

    def __init__(self, frames: int = N, patch: int = 4, hidden: int = 16):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, hidden)
        self.temporal_embedding = nn.Parameter(torch.randn(frames, hidden))
        self.attention = nn.MultiheadAttention(hidden, num_heads=2, batch_first=True)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        k, n, c, h, w = clips.shape
        patches = clips.unfold(3, self.patch, self.patch).unfold(4, self.patch, self.patch)
        patches = patches.permute(0, 1, 3, 4, 2, 5, 6).reshape(k, n, -1, c * self.patch**2)
        tokens = self.embed(patches) + self.temporal_embedding[None, :, None, :]
        per_position = tokens.transpose(1, 2).reshape(-1, n, tokens.shape[-1])
        mixed, _ = self.attention(per_position, per_position, per_position)
        return mixed.reshape(k, -1, n, tokens.shape[-1]).transpose(1, 2)


@pytest.fixture(scope="module")
def frames32():
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_windowed_encoder_interleaved_groups_equal_hand_computation(frames32):
    torch.manual_seed(0)
    encoder = WindowTemporalEncoder().eval()
    k = frames32.shape[0] // N
    with torch.no_grad():
        got = encode_in_groups(frames32, encoder, N, "interleaved")
        by_hand = torch.empty(32, 4, 16)
        for j in range(k):
            clip_tokens = encoder(frames32[j::k][None])[0]  # frames j, j+K, j+2K, ...
            for i in range(N):
                by_hand[j + i * k] = clip_tokens[i]
        consecutive = encode_in_groups(frames32, encoder, N, "consecutive")
        consecutive_by_hand = torch.cat([encoder(frames32[j * N:(j + 1) * N][None])[0] for j in range(k)])
    assert torch.equal(got, by_hand.flatten(0, 1))
    assert torch.equal(consecutive, consecutive_by_hand.flatten(0, 1))
    assert not torch.allclose(got, consecutive, atol=1e-3)


def test_per_frame_tower_intp_equals_encoding_all_frames(tiny_model_dir):
    hf = load_hf_model(str(tiny_model_dir))
    tower, projector = hf.model.video_tower, hf.model.multi_modal_projector

    def encode_frames(pixels: torch.Tensor) -> torch.Tensor:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[hf.config.vision_feature_layer]
        return projector(hidden)

    pixels = torch.randn(32, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = encode_frames(pixels).flatten(0, 1)
        grouped = encode_in_groups(pixels, lambda clips: encode_frames(clips.flatten(0, 1)).unflatten(0, clips.shape[:2]), N)
        shuffled = encode_in_groups(pixels, lambda clips: encode_frames(clips.flatten(0, 1)).unflatten(0, clips.shape[:2]).flip(1), N)
    assert torch.equal(grouped, direct)
    assert not torch.equal(shuffled, direct)  # a wrong re-ordering is caught


def test_unknown_grouping_and_bad_encoder_output_are_errors(frames32):
    with pytest.raises(ValueError, match="grouping 'random' is not one of interleaved, consecutive"):
        encode_in_groups(frames32, lambda c: c, N, "random")
    with pytest.raises(ValueError, match=r"encoder returned shape \(32, 3, 8, 8\)"):
        encode_in_groups(frames32, lambda c: c.flatten(0, 1), N)


class RecordingEncoder(nn.Module):
    """WindowTemporalEncoder that records how many frames each call saw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = WindowTemporalEncoder().eval()
        self.calls: list[int] = []

    def forward(self, clips):
        self.calls.append(clips.shape[0] * clips.shape[1])
        return self.inner(clips)


@pytest.mark.parametrize("grouping", ["interleaved", "consecutive"])
def test_chunked_encoding_equals_one_call_bit_for_bit_and_bounds_each_call(grouping):
    pixels = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    encoder = RecordingEncoder()
    with torch.no_grad():
        one_call = encode_in_groups(pixels, encoder, N, grouping, chunk_frames=256)
        assert encoder.calls == [256]
        encoder.calls.clear()
        chunked = encode_in_groups(pixels, encoder, N, grouping, chunk_frames=64)
        assert encoder.calls == [64] * 4  # each call at most 64 frames, whatever the video's length
        encoder.calls.clear()
        clip_by_clip = encode_in_groups(pixels, encoder, N, grouping, chunk_frames=3)  # at least one clip a call
        assert encoder.calls == [N] * 32
        wrong = encode_in_groups(pixels.roll(1, 0), encoder, N, grouping, chunk_frames=64)  # negative control
    assert torch.equal(chunked, one_call) and torch.equal(clip_by_clip, one_call)
    assert not torch.equal(wrong, one_call)


def test_chunked_per_frame_tower_equals_encoding_all_frames(tiny_model_dir):
    hf = load_hf_model(str(tiny_model_dir))
    tower, projector = hf.model.video_tower, hf.model.multi_modal_projector

    def encode_clips(clips: torch.Tensor) -> torch.Tensor:
        hidden = tower(clips.flatten(0, 1), output_hidden_states=True).hidden_states[hf.config.vision_feature_layer]
        return projector(hidden).unflatten(0, clips.shape[:2])

    pixels = torch.randn(128, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one_call = encode_in_groups(pixels, encode_clips, N, chunk_frames=128)
        chunked = encode_in_groups(pixels, encode_clips, N, chunk_frames=16)
    assert torch.equal(chunked, one_call)
