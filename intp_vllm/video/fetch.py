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
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_IN = " (closed deployments opt in with --allow-private-media-hosts or --allowed-media-networks)"
READ_CHUNK_BYTES = 64 << 10


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
