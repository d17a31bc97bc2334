"""The results file of `intp-vllm batch`: appended a chunk at a time with one fsync'd write, read
back on start (done ids are skipped, a line cut by a kill is dropped)."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from intp_vllm.apps.batch.jobs import BatchError, id_key


@dataclass
class Done:
    """What an earlier run left in the results file."""

    keys: set = field(default_factory=set)
    repaired: str | None = None
    rewritten: bool = False


def _as_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if isinstance(record, dict) and "id" in record and ("answer" in record or "error" in record):
        return record
    return None


def load_results(path: Path, retry_errors: bool = False) -> Done:
    """Read the results so far, repairing a cut last line; with retry_errors, drop error records.

    We only ever append whole lines ending in a newline, so bytes after the last newline are
    a record cut by a kill mid-write (dropped, its job runs again) or, if they parse, a whole
    record that lost only its newline (kept). A bad line before that is not ours to guess
    about: BatchError names it.
    """
    path = Path(path)
    done = Done()
    data = path.read_bytes() if path.exists() else b""
    complete, _, tail = data.rpartition(b"\n")
    records = []
    for number, raw in enumerate(complete.split(b"\n"), start=1):
        record = _as_record(raw) if raw.strip() else {}
        if record is None:
            raise BatchError(f"{path}:{number} is not a result record; fix or remove that line "
                             "(only a cut last line is repaired automatically)")
        if record:
            records.append(record)
    tail_record = _as_record(tail) if tail.strip() else None
    if tail_record is not None:
        records.append(tail_record)
        _append(path, b"\n")
    elif tail:
        _truncate(path, len(data) - len(tail))
        done.repaired = f"dropped a cut last line ({len(tail)} bytes) of {str(path)!r}; its job runs again"
    if retry_errors and any("error" in r for r in records):
        records = [r for r in records if "error" not in r]
        _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        done.rewritten = True
    done.keys = {id_key(r["id"]) for r in records}
    return done


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)
        os.fsync(handle.fileno())


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)
        os.fsync(handle.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace the file whole, so a kill during the rewrite leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultWriter:
    """Appends records, one write + fsync a call; an exclusive lock keeps a second run off the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = self._open_locked()

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BatchError(f"results file {str(self.path)!r} is in use by another batch run") from None
        return fd

    def reopen(self) -> None:
        """After load_results replaced the file (--retry-errors), append to the new one."""
        old, self.fd = self.fd, self._open_locked()
        os.close(old)

    def write(self, records: list[dict]) -> None:
        data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
