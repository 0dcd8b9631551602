"""What a download may reach, and how its URL is sent: the rules every request of `unclip ingest` obeys.

img2dataset fetches each picture with `urllib.request.urlopen`, which goes through the process's
installed opener. A download task installs ours (`install`) before its Downloader starts, so
downloading, retries, resizing and the per-sample status stay exactly img2dataset's, and:

- A URL is sent as a browser sends it: path and query percent-encoded as UTF-8, the host
  IDNA-encoded (`browser_url`). The sample's key stays the hash of the URL as listed. A URL that
  cannot be made valid fails with a message starting "invalid URL".
- A connection resolves its host itself and connects only to an address outside the blocked
  networks (`refusal`: loopback, private, link-local, shared, multicast, reserved), unless
  `ingest.allow_networks` opens it. The address checked is the address connected to, and every hop
  of a redirect is a new request through the same opener, so neither a host that resolves
  differently the second time (DNS rebinding) nor a redirect reaches a blocked network. A refused
  request fails with a message starting "blocked address" and never reaches the host.

A URL list is untrusted input, and download tasks run inside the cluster's network, next to its
services and the cloud's metadata endpoint (169.254.169.254, which hands out the node's
credentials): that is why the default refuses every non-public address.

Why an installed opener rather than our own downloader: `urlopen` is the one seam img2dataset
offers, and a download task's process runs nothing else that fetches URLs.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence

import idna

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED_PREFIX = "blocked address"  # how a refused request's message starts (its failure reason)
INVALID_PREFIX = "invalid URL"
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that reach an IPv4 one
# What a browser leaves as it is in a path and in a query ('%' keeps escapes already there).
_PATH_SAFE = "/%:@!$&'()*+,;=~-._"
_QUERY_SAFE = _PATH_SAFE + "?"
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a name, or an address (IPv6 without its brackets)


class BlockedAddress(OSError):
    """A request whose host resolves only to addresses in blocked networks."""


class InvalidUrl(ValueError):
    """A URL no encoding makes valid (a host IDNA refuses, a port that is not a number)."""


def parse_networks(cidrs: Sequence[str], key: str = "ingest.allow_networks") -> list[Network]:
    """CIDRs (or single addresses) as networks; one clear line for the first that is not one."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"config key '{key}': {cidr!r} is not a network (expected CIDRs such as 10.0.0.0/8 or 127.0.0.1)"
            ) from None
    return out


def refusal(address: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why a download may not connect to `address` ("private", "loopback", ...), or None when it may."""
    ip: Address = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is no part of it
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv6 form of an IPv4 address is judged as that address
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in network for network in allowed if network.version == ip.version):
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.version == 4 and ip in _SHARED:
        return "shared"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def ascii_host(host: str) -> str:
    """A host name as DNS knows it: IDNA (UTS 46) where it holds characters outside ASCII."""
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as err:
        raise InvalidUrl(f"{INVALID_PREFIX}: host {host!r}: {err}") from None


def browser_url(url: str) -> str:
    """`url` as a browser requests it: UTF-8 percent-encoding, an IDNA host, no fragment."""
    if url.isascii() and " " not in url and "#" not in url:
        return url
    parts = urllib.parse.urlsplit(url.strip())
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:  # a port that is not a number
        raise InvalidUrl(f"{INVALID_PREFIX}: {err}") from None
    if not host:
        raise InvalidUrl(f"{INVALID_PREFIX}: no host")
    host = ascii_host(host)
    if not _HOST.fullmatch(host):
        raise InvalidUrl(f"{INVALID_PREFIX}: host {host!r} holds characters no host name has")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if "@" in parts.netloc:
        netloc = urllib.parse.quote(parts.netloc.rpartition("@")[0], safe=":%") + "@" + netloc
    path = urllib.parse.quote(parts.path, safe=_PATH_SAFE)
    query = urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


def connect(
    address: tuple[str, int],
    timeout: float | None,
    source_address: tuple[str, int] | None,
    allowed: Sequence[Network],
) -> socket.socket:
    """`socket.create_connection`, to the first resolved address that no blocked network holds."""
    host, port = address
    refused: tuple[str, str] | None = None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        why = refusal(ip, allowed)
        if why is not None:
            refused = refused or (ip, why)
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is None or isinstance(timeout, (int, float)):  # else socket's default-timeout sentinel
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last = err
    if last is not None:
        raise last
    if refused is not None:
        raise BlockedAddress(
            f"{BLOCKED_PREFIX}: {host} is {refused[0]}, a {refused[1]} address (ingest.allow_networks opens it)"
        )
    raise OSError(f"{host}: the resolver returned no address")


def opener(allowed: Sequence[Network]) -> urllib.request.OpenerDirector:
    """urllib's default opener, with browser URLs and checked connections (see the module's docstring)."""

    def checked(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Checked(base):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = lambda addr, timeout, source: connect(addr, timeout, source, allowed)

        return Checked

    http_connection, https_connection = checked(http.client.HTTPConnection), checked(http.client.HTTPSConnection)

    class BrowserUrls(urllib.request.BaseHandler):
        handler_order = 100  # before urllib's own request processing, which reads the host

        def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
            req.full_url = browser_url(req.full_url)
            return req

        https_request = http_request

    class CheckedHTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class CheckedHTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req)  # the connection makes the default TLS context

    return urllib.request.build_opener(BrowserUrls, CheckedHTTP, CheckedHTTPS)


def install(allow_networks: Sequence[str]) -> None:
    """Every `urlopen` of this process (img2dataset's downloads) goes through `opener`."""
    urllib.request.install_opener(opener(parse_networks(allow_networks)))
