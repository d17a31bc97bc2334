"""The CPU KV cache size the plugin picks when no memory flag is given (cpu_memory.py)."""

from __future__ import annotations

from intp_vllm.vllm_ext.cpu_memory import KV_CACHE_FLOOR_BYTES, cpu_kv_cache_bytes, weight_bytes

MiB = 1 << 20


def test_the_configuration_needs_are_taken_when_they_fit():
    assert cpu_kv_cache_bytes(4 * MiB, 32, available=8192 * MiB, weights=0) == 128 * MiB


def test_small_needs_get_the_floor():
    assert cpu_kv_cache_bytes(MiB // 4, 4, available=8192 * MiB, weights=0) == KV_CACHE_FLOOR_BYTES


def test_large_needs_are_capped_at_half_of_what_the_weights_leave_split_over_replicas():
    needed_per_sequence, seqs = 2048 * MiB // 4, 256  # a 7B model at 4K tokens: 2 GiB a sequence
    assert cpu_kv_cache_bytes(needed_per_sequence, seqs, available=20480 * MiB, weights=13312 * MiB) == 3584 * MiB
    assert cpu_kv_cache_bytes(needed_per_sequence, seqs, 20480 * MiB, 13312 * MiB, replicas=2) == 1792 * MiB


def test_one_full_length_sequence_is_kept_even_above_the_cap():
    """Below it vLLM could not serve max_model_len at all; it then says so itself."""
    assert cpu_kv_cache_bytes(4096 * MiB, 8, available=4096 * MiB, weights=1024 * MiB) == 4096 * MiB


def test_weight_bytes_counts_a_local_checkpoints_weight_files(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(bytes(1000))
    (tmp_path / "pytorch_model.bin").write_bytes(bytes(24))
    (tmp_path / "config.json").write_text("{}")
    assert weight_bytes(str(tmp_path)) == 1024
    assert weight_bytes("LanguageBind/Video-LLaVA-7B-hf") == 0


def test_a_long_max_model_len_reserves_two_full_length_sequences_and_the_rest_at_typical_length():
    """--max-frames 1024 on the needle model (17,920 tokens, 3 KiB a token) with the server's 128
    sequences: 2 x 17,920 + 126 x 648 tokens (an 8-frame request), not 128 x 17,920."""
    per_token = 3 * 1024
    size = cpu_kv_cache_bytes(17920 * per_token, 128, available=16384 * MiB, weights=0,
                              typical_per_sequence=648 * per_token)
    assert size == (2 * 17920 + 126 * 648) * per_token  # 344 MiB where every sequence at full length took 6.6 GiB
    assert cpu_kv_cache_bytes(17920 * per_token, 128, 16384 * MiB, 0) == 128 * 17920 * per_token  # the old rule
    assert cpu_kv_cache_bytes(100_000 * per_token, 1, 16384 * MiB, 0, typical_per_sequence=648 * per_token) == \
        100_000 * per_token  # one sequence: one full length
    # a typical length past max_model_len counts as max_model_len
    assert cpu_kv_cache_bytes(MiB, 64, 16384 * MiB, 0, typical_per_sequence=2 * MiB) == 64 * MiB
