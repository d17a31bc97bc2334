"""Lifecycle of offline `vllm.LLM` engines started by our commands and tests."""

from __future__ import annotations

import gc


def shutdown_llm(llm) -> None:
    """Stop an offline engine's core process and its workers now, not when the `LLM` object is
    collected: a process that runs engines one after another (eval-needle's cells, bench's
    runs, the tests) would otherwise hold two engines' memory at once."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()
