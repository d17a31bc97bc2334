"""Each run in its own spawned process (clean memory peak, no state shared between engines),
with the peak memory of its process tree sampled while it runs."""

from __future__ import annotations

import multiprocessing
import traceback


def _child(conn, fn, kwargs) -> None:
    """Runs `fn(report, **kwargs)`; `fn` reports its result once, then may clean up."""
    reported = False

    def report(result: dict) -> None:
        nonlocal reported
        conn.send(("ok", result))
        reported = True

    try:
        fn(report, **kwargs)
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        if not reported:
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _tree(pid: int) -> list:
    """A process and its descendants (vLLM: frontend, engine core, worker)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _memory_sum(processes: list, field: str, full: bool) -> int:
    import psutil

    total = 0
    for process in processes:
        try:
            info = process.memory_full_info() if full else process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += getattr(info, field)
    return total


RSS_EVERY_S = 0.5
PSS_EVERY = 6
"""PSS reads /proc/*/smaps (costly: it would steal CPU from the run), so every 6th sample only."""


def run_isolated(fn, **kwargs):
    """`fn(report, **kwargs)` in a fresh spawned process -> (the result it reported, with the peak
    memory of its process tree; the process, maybe still cleaning up: pass it to `stop`).

    RSS sums count pages shared between processes (the torch libraries) once per process, which
    weighs against vLLM's three processes; PSS splits shared pages and is recorded beside it."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, kwargs))
    process.start()
    sender.close()
    peak_rss = peak_pss = samples = 0
    try:
        while not receiver.poll(RSS_EVERY_S):
            if not process.is_alive():
                raise RuntimeError(f"{fn.__name__} process died with exit code {process.exitcode} before reporting")
            tree = _tree(process.pid)
            peak_rss = max(peak_rss, _memory_sum(tree, "rss", full=False))
            if samples % PSS_EVERY == 0:
                peak_pss = max(peak_pss, _memory_sum(tree, "pss", full=True))
            samples += 1
        status, payload = receiver.recv()
    except BaseException:
        stop(process)
        raise
    if status != "ok":
        stop(process)
        raise RuntimeError(f"{fn.__name__} failed:\n{payload}")
    payload.update(peak_rss_mib=peak_rss / 2**20, peak_pss_mib=peak_pss / 2**20)
    return payload, process


def stop(process, timeout: float = 60.0) -> None:
    """Wait for a run's process to exit (it shuts its engine down first); kill it if it hangs."""
    process.join(timeout=timeout)
    if process.is_alive():
        process.kill()
        process.join()
