"""Fetching a video over http(s) for someone else without exposing this host's network (SSRF).

A request that names `http://169.254.169.254/...`, `http://127.0.0.1:<admin port>/` or a
private address would otherwise make the server read its own network for the client. So
every host is resolved by `GuardedResolver`, which drops addresses that are not globally
routable (loopback, RFC 1918 and unique-local private, link-local, CGNAT, multicast,
unspecified, reserved); the connection is then made to an address that passed (aiohttp
connects to what the resolver returned, so there is no second lookup to rebind). Hosts
written as IP literals skip resolution and are checked directly. Redirects are followed
here, one hop at a time, each hop checked the same way, at most `HostPolicy.max_redirects`.

Bodies are read in chunks and the fetch stops once `max_bytes` is crossed. Failures raise
`FetchError`, whose message names the URL, the host and the reason; `refused` tells a
policy refusal (the client's fault: a 400) from a failed fetch (a 422).

Used by `intp-vllm serve` (`vllm_ext.media.SafeMediaConnection`) and `intp-vllm batch`
(`apps.batch.videos`).

Local files (`file://` under the server's allowed directory) are read by `read_local_file`:
only regular files (a FIFO, socket, device or directory is refused from its `stat`, before
it is opened, and the open itself cannot block), in a `FileReadSlots` thread, so that a read
that never returns (a stalled network mount) holds one slot, not a thread other videos need.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_IN = " (closed deployments opt in with --allow-private-media-hosts or --allowed-media-networks)"
READ_CHUNK_BYTES = 64 << 10
FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
"""What `read_local_file` names a path that is not a regular file."""
SLOT_POLL_S = 0.05

logger = logging.getLogger("vllm.intp_vllm")  # under "vllm": its handler and level apply


class FetchError(Exception):
    """A video URL that could not be fetched, or was `refused`: it broke one of this host's
    rules (address, domain, scheme, size), which is the client's fault, not the remote's."""

    def __init__(self, url: str, message: str, refused: bool = False) -> None:
        super().__init__(f"{short_url(url)}: {message}")
        self.refused = refused


class RefusedAddress(OSError):
    """Raised by GuardedResolver; aiohttp wraps it in a ClientConnectorError."""


def short_url(url: str) -> str:
    """A URL short enough for an error message (data URLs run to megabytes)."""
    return repr(url) if len(url) <= 100 else f"{url[:60]!r}... ({len(url)} characters)"


def address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped or address.sixtofour):
        address = address.ipv4_mapped or address.sixtofour  # the IPv4 address it reaches
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"


@dataclass(frozen=True)
class HostPolicy:
    """Which addresses may be fetched: public ones, plus `allowed_networks` (CIDRs), or all
    of them with `allow_private`; and how many redirects are followed."""

    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    max_redirects: int = 5

    def __post_init__(self) -> None:
        try:
            networks = tuple(ipaddress.ip_network(text, strict=False) for text in self.allowed_networks)
        except ValueError as exc:
            raise ValueError(f"allowed media networks: {exc}; expected CIDRs such as 10.0.0.0/8 or fd00::/8") from None
        object.__setattr__(self, "_networks", networks)
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"max redirects must be a non-negative integer, got {self.max_redirects!r}")

    @classmethod
    def from_args(cls, args) -> "HostPolicy":
        """From serve's and batch's --allow-private-media-hosts and --allowed-media-networks."""
        return cls(allow_private=args.allow_private_media_hosts, allowed_networks=tuple(args.allowed_media_networks))

    def refusal(self, address: str) -> str | None:
        """Why `address` (an IP literal) may not be fetched, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        kind = address_kind(ip)
        if kind is None or self.allow_private or any(ip in network for network in self._networks):
            return None
        return f"{ip}, {'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


class GuardedResolver:
    """aiohttp resolver (`TCPConnector(resolver=...)`) that keeps only addresses `policy` allows."""

    def __init__(self, policy: HostPolicy) -> None:
        from aiohttp import ThreadedResolver

        self.policy = policy
        self.inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        found = await self.inner.resolve(host, port, family)
        allowed = [info for info in found if self.policy.refusal(info["host"]) is None]
        if not allowed:
            reasons = sorted({self.policy.refusal(info["host"]) for info in found})
            raise RefusedAddress(f"host {host!r} resolves only to refused addresses: {'; '.join(reasons)}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def _literal_address(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def check_url(url: str, policy: HostPolicy, allowed_domains: tuple[str, ...] = ()) -> None:
    """Refuse a URL before connecting: scheme, allowed domains, IP-literal host."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise FetchError(url, "expected an http(s) URL with a host", refused=True)
    if allowed_domains and parts.hostname not in allowed_domains:
        raise FetchError(url, f"host {parts.hostname!r} is not one of --allowed-media-domains {list(allowed_domains)}",
                         refused=True)
    literal = _literal_address(parts.hostname)
    if literal is not None and (reason := policy.refusal(literal)) is not None:
        raise FetchError(url, f"refused: {reason}{OPT_IN}", refused=True)


async def fetch_bytes(url: str, *, policy: HostPolicy, max_bytes: int, timeout_s: float,
                      allowed_domains: tuple[str, ...] = (), charge: Callable[[int], None] | None = None) -> bytes:
    """The body of `url` (at most `max_bytes`), following redirects under `policy`, within
    `timeout_s` seconds in all. `charge`, if given, is called with the size of each chunk of
    the body as it arrives, before it is kept (a per-request download budget: what it raises
    ends the fetch and propagates). Raises FetchError."""
    import aiohttp

    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    seen = [url]
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for _ in range(policy.max_redirects + 1):
                try:
                    check_url(url, policy, allowed_domains)
                except FetchError as exc:
                    if len(seen) > 1:
                        raise FetchError(seen[0], f"redirected to {exc}", refused=True) from None
                    raise
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        if url in seen:
                            raise FetchError(seen[0], f"redirect loop: {' -> '.join(seen + [url])}")
                        seen.append(url)
                        continue
                    if response.status >= 400:
                        raise FetchError(url, f"HTTP {response.status} {response.reason or ''}".rstrip())
                    return await _read_capped(response, url, max_bytes, charge)
            raise FetchError(seen[0], f"more than {policy.max_redirects} redirects")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, RefusedAddress):
            hop = "" if len(seen) == 1 else f" (redirected from {short_url(seen[0])})"
            raise FetchError(url, f"refused{hop}: {exc.os_error}{OPT_IN}", refused=True) from None
        raise FetchError(url, f"cannot connect to {urlsplit(url).hostname!r}: {exc.os_error}") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise FetchError(url, f"not fetched within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise FetchError(url, f"{type(exc).__name__}: {exc}") from None


async def _read_capped(response, url: str, max_bytes: int, charge: Callable[[int], None] | None) -> bytes:
    if response.content_length is not None and response.content_length > max_bytes:
        raise FetchError(url, f"too large: {response.content_length} bytes; at most {max_bytes} bytes", refused=True)
    chunks, received = [], 0
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        received += len(chunk)
        if received > max_bytes:
            raise FetchError(url, f"too large: more than {max_bytes} bytes", refused=True)
        if charge is not None:
            charge(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def fetch_bytes_sync(url: str, **kwargs) -> bytes:
    """`fetch_bytes` for code without an event loop (batch's decode threads)."""
    return asyncio.run(fetch_bytes(url, **kwargs))


# ------------------------------------------------------------------------------ local files


def file_url_path(url: str) -> Path:
    """The absolute local path of a file URL, as RFC 8089 writes it: `file:///abs/path`,
    `file://localhost/abs/path` or `file:/abs/path`, percent-escapes decoded. Raises ValueError
    for another host or a relative path."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ValueError("expected a file:// URL")
    if parts.netloc.lower() not in ("", "localhost"):
        raise ValueError(f"names host {parts.netloc!r}: file URLs name a path on this server, "
                         "file:///abs/path or file://localhost/abs/path")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError("expected an absolute path, file:///abs/path")
    return Path(path)


def file_kind(mode: int) -> str:
    """'a regular file', 'a FIFO (named pipe)', 'a directory', ... for a `st_mode`."""
    return "a regular file" if stat.S_ISREG(mode) else FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def local_file_stat(path: Path, allowed_dir: Path, max_bytes: int) -> tuple[Path, os.stat_result]:
    """The resolved path and `stat` of the regular file at `path`, which must resolve (symlinks,
    `..`) to a path under `allowed_dir` (resolved); nothing is opened. Blocking: call it
    through `FileReadSlots.run`. Raises ValueError for a path outside `allowed_dir`, anything
    but a regular file (naming its kind) or more than `max_bytes` bytes (messages without the
    path: the caller names the URL); OSError for a missing file."""
    resolved = path.resolve()
    if allowed_dir not in resolved.parents:
        raise ValueError("must be a subpath of `--allowed-local-media-path` (after symlinks and '..' are resolved)")
    found = os.stat(resolved)
    if not stat.S_ISREG(found.st_mode):
        raise ValueError(f"is {file_kind(found.st_mode)}, not a regular file; only video files are read")
    if found.st_size > max_bytes:
        raise ValueError(f"is a file of {found.st_size} bytes; at most {max_bytes} bytes of video are allowed")
    return resolved, found


def read_local_file(path: Path, allowed_dir: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at `path` (checked by `local_file_stat`) and its `stat` as
    read. Blocking: call it through `FileReadSlots.run`.

    Its kind and size come from `stat` on the resolved path, before it is opened; it is then
    opened non-blocking (a FIFO swapped in after the check cannot block the open) and must be
    the file that was checked, unchanged once read. Raises ValueError (as `local_file_stat`,
    or for a file replaced or changed while read) or OSError for an unreadable file."""
    resolved, before = local_file_stat(path, allowed_dir, max_bytes)
    fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise ValueError(f"was replaced by {file_kind(opened.st_mode)} while it was being opened")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"grew past {max_bytes} bytes while it was read; at most {max_bytes} bytes "
                                 "of video are allowed")
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (size, opened.st_mtime_ns):
            raise ValueError("changed while it was read; send it again once it is written")
        return b"".join(chunks), after
    finally:
        os.close(fd)


class FileReadsStuck(Exception):
    """Every `FileReadSlots` slot holds a read that outlived its request: no file can be read."""


class FileReadSlots:
    """At most `slots` blocking file reads at once, each in its own daemon thread.

    `run` waits (asynchronously) for a free slot and for its read; the caller's deadline
    cancels the wait, not the read: a read that has not returned when its caller gave up is
    counted as *stuck* and holds its slot until it returns (logged both times). So reads that
    never return (a stalled network mount) take at most `slots` threads, never a thread pool
    other work needs; once every slot is stuck, `run` raises FileReadsStuck at once and
    `healthy` is False. Daemon threads: a stuck read does not keep the process from exiting.
    Thread-safe; usable from any event loop.
    """

    def __init__(self, slots: int) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"file read slots must be a positive integer, got {slots!r}")
        self.slots = slots
        self._lock = threading.Lock()
        self._running: set[object] = set()
        self._stuck: set[object] = set()

    @property
    def stuck(self) -> int:
        """Reads still running whose caller gave up on them."""
        with self._lock:
            return len(self._stuck)

    @property
    def healthy(self) -> bool:
        """Whether a file read can be started (not every slot is stuck)."""
        return self.stuck < self.slots

    def status(self) -> str:
        """One line on the slots, for /health and logs."""
        with self._lock:
            return f"{len(self._stuck)} of {self.slots} file-read slots stuck, {len(self._running)} in use"

    async def run(self, read, *args):
        """`read(*args)` in a slot's thread; its result or exception. Raises FileReadsStuck when
        every slot holds a stuck read; cancelling the wait (a deadline) leaves the read running,
        counted as stuck until it returns."""
        read_id = object()
        await self._acquire(read_id)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        started = time.monotonic()

        def deliver(result, error) -> None:
            if not waiter.done():
                waiter.set_exception(error) if error is not None else waiter.set_result(result)

        def work() -> None:
            result = error = None
            try:
                result = read(*args)
            except Exception as exc:  # handed to the caller
                error = exc
            finally:
                self._release(read_id, started)
            try:
                loop.call_soon_threadsafe(deliver, result, error)
            except RuntimeError:  # the caller's event loop is gone
                pass

        threading.Thread(target=work, name="intp-file-read", daemon=True).start()
        try:
            return await waiter
        except asyncio.CancelledError:
            with self._lock:
                if read_id in self._running:
                    self._stuck.add(read_id)
                    logger.warning("intp_vllm: a file read has not returned after %.1f s and its request gave up; "
                                   "%d of %d file-read slots stuck", time.monotonic() - started, len(self._stuck),
                                   self.slots)
            raise

    async def _acquire(self, read_id: object) -> None:
        while True:
            with self._lock:
                if len(self._running) < self.slots:
                    self._running.add(read_id)
                    return
                if len(self._stuck) >= self.slots:
                    raise FileReadsStuck(f"every one of this server's {self.slots} file-read slots holds a read "
                                         "that has not returned (a stalled mount or device?); file:// videos "
                                         "cannot be read until one returns")
            await asyncio.sleep(SLOT_POLL_S)

    def _release(self, read_id: object, started: float) -> None:
        with self._lock:
            self._running.discard(read_id)
            if read_id in self._stuck:
                self._stuck.discard(read_id)
                logger.warning("intp_vllm: a stuck file read returned after %.1f s; %d of %d file-read slots stuck",
                               time.monotonic() - started, len(self._stuck), self.slots)
