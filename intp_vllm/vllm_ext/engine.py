"""Lifecycle of vLLM engines: offline `vllm.LLM` engines started by our commands and tests, and
engine-core processes whose parent is gone."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading

ENGINE_CORE_PROCESS = "EngineCore"
"""vLLM's name for its engine-core process (`EngineCore`, `EngineCore_DP<n>`)."""
ORPHAN_GRACE_S = 10.0
"""Seconds an orphaned engine core gets to shut down (and stop its workers) before it is killed."""

_watching = False


def shutdown_llm(llm) -> None:
    """Stop an offline engine's core process and its workers now, not when the `LLM` object is
    collected: a process that runs engines one after another (eval-needle's cells, bench's
    runs, the tests) would otherwise hold two engines' memory at once."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def end_with_parent() -> None:
    """In vLLM's engine-core process (called by the plugin in every vLLM process; elsewhere a
    no-op): a daemon thread that waits for the process that started it (an API server, an
    `LLM`, a Ray Serve replica) to die, then ends this engine: SIGTERM, so vLLM shuts down and
    stops its workers (they watch the engine core), and SIGKILL after `ORPHAN_GRACE_S`.

    vLLM 0.32's engine core does not watch its parent: a replica or API server killed with
    SIGKILL (OOM killer, Ray's failover test, a crashed host process) left its engine core and
    workers running, holding the engine's memory (on a GPU node, its GPU memory) while a
    replacement started. Idempotent."""
    global _watching
    parent = multiprocessing.parent_process()
    if _watching or parent is None or not multiprocessing.current_process().name.startswith(ENGINE_CORE_PROCESS):
        return
    _watching = True

    def watch() -> None:
        parent.join()  # returns once the parent's end of the spawn pipe is closed: it has exited
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(ORPHAN_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="intp-end-with-parent", daemon=True).start()
