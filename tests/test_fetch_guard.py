"""What a download may reach and how its URL is sent (data_pipeline/fetch_guard.py), against real
sockets on loopback; tests/test_ingest.py runs the same rules inside img2dataset's downloads."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.error

import pytest

from data_pipeline import fetch_guard
from data_pipeline.config import IngestConfig
from data_pipeline.filters import failure_reason
from models.base.configlib import ConfigError, build


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud's metadata service
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "shared"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "reserved"),
        ("240.0.0.1", "reserved"),
        ("::ffff:10.0.0.1", "private"),  # IPv4 written as IPv6 is judged as the IPv4 address
        ("64:ff9b::a9fe:a9fe", "link-local"),  # 169.254.169.254 through NAT64
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
    ],
)
def test_every_non_public_address_is_refused(address, why):
    assert fetch_guard.refusal(address) == why


def test_allowed_networks_open_exactly_what_they_hold():
    allowed = fetch_guard.parse_networks(["127.0.0.1", "10.20.0.0/16"])
    assert fetch_guard.refusal("127.0.0.1", allowed) is None
    assert fetch_guard.refusal("127.0.0.2", allowed) == "loopback"
    assert fetch_guard.refusal("10.20.3.4", allowed) is None
    assert fetch_guard.refusal("10.21.0.1", allowed) == "private"
    with pytest.raises(ConfigError, match=r"ingest.allow_networks': '10.0.0.0/33' is not a network"):
        build(IngestConfig, {"allow_networks": ["10.0.0.0/33"]})


@pytest.mark.parametrize(
    ("listed", "sent"),
    [
        ("http://h.example/plain.png", "http://h.example/plain.png"),
        ("http://h.example/flag_Réunion.png", "http://h.example/flag_R%C3%A9union.png"),
        ("https://schwäbisch-gmünd.example/rathaus.png", "https://xn--schwbisch-gmnd-8hb60b.example/rathaus.png"),
        (
            "http://h.example/women’s room.png?größe=1&a=%20b#top",
            "http://h.example/women%E2%80%99s%20room.png?gr%C3%B6%C3%9Fe=1&a=%20b",
        ),
        ("http://[::1]:8080/ä", "http://[::1]:8080/%C3%A4"),
    ],
)
def test_urls_are_sent_as_a_browser_sends_them(listed, sent):
    assert fetch_guard.browser_url(listed) == sent


@pytest.mark.parametrize(
    "listed", ["http://" + "ä" * 70 + ".example/x.png", "http://h.example:port/ä.png", "http://a b.example/x"]
)
def test_a_url_no_encoding_makes_valid_fails_as_invalid_url(listed):
    with pytest.raises(fetch_guard.InvalidUrl) as err:
        fetch_guard.browser_url(listed)
    assert failure_reason(str(err.value)) == "invalid_url"


@pytest.fixture
def listener_on_127_0_0_2():
    """A TCP listener on 127.0.0.2 that records every connection it accepts."""
    server = socket.create_server(("127.0.0.2", 0))
    server.settimeout(0.2)
    accepted: list[tuple] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_a_refused_address_is_never_connected_to(listener_on_127_0_0_2):
    port, accepted = listener_on_127_0_0_2
    opener = fetch_guard.opener(fetch_guard.parse_networks(["127.0.0.1"]))
    with pytest.raises(urllib.error.URLError) as err:
        opener.open(f"http://127.0.0.2:{port}/x.png", timeout=2)
    assert failure_reason(str(err.value)) == "blocked_address"
    assert "127.0.0.2, a loopback address" in str(err.value)
    with pytest.raises(fetch_guard.BlockedAddress):  # a name is judged by what it resolves to
        fetch_guard.connect(("localhost", port), 2.0, None, [])
    assert accepted == []
    # opened, the same address is reached
    fetch_guard.connect(("127.0.0.2", port), 2.0, None, fetch_guard.parse_networks(["127.0.0.0/8"])).close()
    threading.Event().wait(0.5)
    assert len(accepted) == 1


def test_every_redirect_hop_is_checked(listener_on_127_0_0_2):
    port, accepted = listener_on_127_0_0_2

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/secret")
            self.end_headers()

        def log_message(self, *args):
            pass

    public = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=public.serve_forever, daemon=True).start()
    try:
        opener = fetch_guard.opener(fetch_guard.parse_networks(["127.0.0.1"]))
        with pytest.raises(urllib.error.URLError) as err:
            opener.open(f"http://127.0.0.1:{public.server_address[1]}/start", timeout=2)
        assert failure_reason(str(err.value)) == "blocked_address"
    finally:
        public.shutdown()
        public.server_close()
    assert accepted == []
