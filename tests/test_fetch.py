"""fetch.py against real http servers on loopback addresses (no outside network).

127.0.0.2 stands for an allowed host (`allowed_networks`), 127.0.0.1 for the host's own
services; Linux routes all of 127/8 to loopback, so one machine plays both.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from intp_vllm.video.fetch import FetchError, HostPolicy, address_kind, fetch_bytes_sync

ALLOWED_HOST = "127.0.0.2"
BODY = b"video bytes"


class Handler(BaseHTTPRequestHandler):
    own_port = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        routes = {
            "/to-loopback": (302, {"Location": f"http://127.0.0.1:{self.own_port}/clip"}),
            "/to-localhost": (307, {"Location": f"http://localhost:{self.own_port}/clip"}),
            "/loop": (302, {"Location": "/loop-back"}),
            "/loop-back": (302, {"Location": "/loop"}),
            "/relative": (301, {"Location": "/clip"}),
            "/missing": (404, {}),
        }
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"10000\r\n" + bytes(0x10000) + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/hops/"):
            left = int(self.path.rsplit("/", 1)[1])
            status, headers = (302, {"Location": f"/hops/{left - 1}"}) if left else (200, {})
        else:
            status, headers = routes.get(self.path, (200, {}))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        body = BODY if status == 200 else b""
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def port():
    """One port, served on 127.0.0.2 (allowed) and 127.0.0.1 (the host's own)."""
    allowed = ThreadingHTTPServer((ALLOWED_HOST, 0), Handler)
    Handler.own_port = allowed.server_address[1]
    own = ThreadingHTTPServer(("127.0.0.1", Handler.own_port), Handler)
    for server in (allowed, own):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Handler.own_port
    for server in (allowed, own):
        server.shutdown()
        server.server_close()


ALLOWED = HostPolicy(allowed_networks=(f"{ALLOWED_HOST}/32",))


def fetch(url: str, policy: HostPolicy = ALLOWED, max_bytes: int = 1 << 20) -> bytes:
    return fetch_bytes_sync(url, policy=policy, max_bytes=max_bytes, timeout_s=10)


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:{port}/clip", "127.0.0.1, a loopback address"),
    ("http://[::1]:{port}/clip", "::1, a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/clip", "::ffff:7f00:1, a loopback address"),
    ("http://localhost:{port}/clip", "host 'localhost' resolves only to refused addresses: 127.0.0.1, a loopback"),
    ("http://10.1.2.3/clip", "10.1.2.3, a private address"),
    ("http://192.168.0.10/clip", "192.168.0.10, a private address"),
    ("http://[fd00::1]/clip", "fd00::1, a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
    ("http://100.64.0.1/clip", "100.64.0.1, a non-public address"),
    ("http://0.0.0.0:{port}/clip", "0.0.0.0, an unspecified address"),
    ("http://[2002:7f00:1::]/clip", "2002:7f00:1::, a loopback address"),
    ("http://224.0.0.1/clip", "224.0.0.1, a multicast address"),
])
def test_non_public_hosts_are_refused_before_connecting(port, url, reason):
    with pytest.raises(FetchError, match="refused: " + reason.replace("(", r"\(")) as caught:
        fetch(url.format(port=port))
    assert caught.value.refused
    assert "--allow-private-media-hosts" in str(caught.value)


def test_allowed_network_is_fetched_and_the_opt_in_restores_local_hosts(port):
    assert fetch(f"http://{ALLOWED_HOST}:{port}/clip") == BODY
    assert fetch(f"http://{ALLOWED_HOST}:{port}/relative") == BODY
    assert fetch(f"http://127.0.0.1:{port}/clip", HostPolicy(allow_private=True)) == BODY
    assert fetch(f"http://localhost:{port}/clip", HostPolicy(allow_private=True)) == BODY
    with pytest.raises(FetchError, match="127.0.0.2, a loopback address"):  # negative control
        fetch(f"http://{ALLOWED_HOST}:{port}/clip", HostPolicy())


@pytest.mark.parametrize("path, message", [
    ("/to-loopback", r"redirected to 'http://127.0.0.1:\d+/clip': refused: 127.0.0.1, a loopback address"),
    ("/to-localhost", r"refused \(redirected from 'http://127.0.0.2:\d+/to-localhost'\): host 'localhost'"),
])
def test_every_redirect_hop_is_checked(port, path, message):
    with pytest.raises(FetchError, match=message) as caught:
        fetch(f"http://{ALLOWED_HOST}:{port}{path}")
    assert caught.value.refused


def test_redirects_are_bounded_and_loops_named(port):
    base = f"http://{ALLOWED_HOST}:{port}"
    assert fetch(f"{base}/hops/5") == BODY
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(f"{base}/hops/6")
    with pytest.raises(FetchError, match=r"redirect loop: http://127.0.0.2:\d+/loop -> .*/loop-back -> .*/loop$"):
        fetch(f"{base}/loop")


def test_failures_name_the_url_and_reason(port):
    base = f"http://{ALLOWED_HOST}:{port}"
    with pytest.raises(FetchError, match=r"'http://127.0.0.2:\d+/missing': HTTP 404 Not Found") as caught:
        fetch(f"{base}/missing")
    assert not caught.value.refused
    with pytest.raises(FetchError, match="expected an http\\(s\\) URL"):
        fetch("ftp://example.com/clip.mp4")
    with pytest.raises(FetchError, match="host 'elsewhere.example' is not one of --allowed-media-domains"):
        fetch_bytes_sync("http://elsewhere.example/clip", policy=ALLOWED, max_bytes=10, timeout_s=5,
                         allowed_domains=("videos.example",))


def test_bodies_stop_at_the_byte_limit(port):
    base = f"http://{ALLOWED_HOST}:{port}"
    with pytest.raises(FetchError, match=f"too large: {len(BODY)} bytes; at most 4 bytes") as caught:
        fetch(f"{base}/clip", max_bytes=4)
    assert caught.value.refused
    with pytest.raises(FetchError, match="too large: more than 1048576 bytes"):
        fetch(f"{base}/chunked")  # 4 MiB, chunked: no Content-Length to refuse it from
    assert len(fetch(f"{base}/chunked", max_bytes=4 << 20)) == 4 << 20


def test_address_kinds_and_bad_networks():
    import ipaddress

    assert address_kind(ipaddress.ip_address("8.8.8.8")) is None
    assert address_kind(ipaddress.ip_address("2606:4700::1111")) is None
    with pytest.raises(ValueError, match="allowed media networks: .*expected CIDRs"):
        HostPolicy(allowed_networks=("10.0.0.0/40",))
