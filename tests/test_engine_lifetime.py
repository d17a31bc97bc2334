"""An engine core whose parent dies ends with it (engine.end_with_parent).

The field report: a Ray Serve replica killed with SIGKILL left its vLLM engine core and worker
running, holding the engine's memory while the replacement started. The same happens to any
process that owns an engine: here an offline `LLM` in a subprocess, killed with SIGKILL; vLLM
0.32 alone left `VLLM::EngineCore` and `VLLM::Worker` running (20 s later, by hand).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import ENGINE_KV_BYTES

pytestmark = pytest.mark.engine

OWNER = """
import sys, time
from vllm import LLM
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, kv_cache_memory_bytes=int(sys.argv[2]),
          max_num_seqs=2, limit_mm_per_prompt={"video": 1})
print("ready", flush=True)
time.sleep(600)
"""


def test_engine_core_and_workers_end_when_the_process_that_owns_them_is_killed(tiny_model_dir):
    import psutil

    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tiny_model_dir), str(ENGINE_KV_BYTES)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in owner.stdout:
            if line.startswith("ready"):
                break
        engine = psutil.Process(owner.pid).children(recursive=True)
        assert any("EngineCore" in process.name() for process in engine), [p.name() for p in engine]
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()

    def alive():
        return [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(p.pid, p.name()) for p in alive()]
    for process in alive():  # do not leave them to the next test
        process.kill()
    assert not left, left
