"""Where the server may be reached and by whom: loopback checks, access tokens, and the addresses WebRTC media uses.

Without a token the server answers on loopback only (serve/server.py refuses other Host headers). ``ice_hosts``
limits the addresses ICE gathers on; when they are all loopback the browser's other candidates are dropped too.
``ice_servers`` (``--ice-server``): STUN/TURN servers for both ends, so a server behind NAT (a Ray worker with a
private address) can still be reached: the server gathers reflexive/relayed candidates with them, and the page
reads the same list from ``GET /ice-servers`` before it makes its offer.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(18)


def request_token(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Streamedit-Token") or request.query.get("token", "")


def filter_candidates(sdp: str, ice_hosts: list[str] | None) -> str:
    """With loopback-only media, drop the browser's non-loopback ICE candidates (so nothing else is tried)."""
    if not ice_hosts or not all(is_loopback(h) for h in ice_hosts):
        return sdp
    keep = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or not is_loopback(parts[4]):
                continue
        keep.append(line)
    return "\r\n".join(keep) + "\r\n"


def restrict_ice_hosts(addresses: list[str]) -> None:
    """Make aioice gather host candidates only on ``addresses`` (it skips 127.0.0.1 by default)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)


def parse_ice_servers(urls: list[str], username: str | None = None, credential: str | None = None) -> list[dict]:
    """``--ice-server`` URLs (``stun:HOST[:PORT]``, ``turn:HOST[:PORT][?transport=udp|tcp]``, ``turns:...``) as
    the ``RTCIceServer`` dicts a browser takes; TURN ones get ``username``/``credential``, which they need.
    Checked with aiortc's own parser (the server side uses the first STUN and the first TURN server; the page
    all of them). ValueError says what is wrong with the first bad one."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    servers = []
    for url in urls:
        try:
            parsed = parse_stun_turn_uri(url)
            if parsed["host"].startswith("/"):  # stun://host: aiortc reads "//host", a browser refuses it
                raise ValueError
            scheme = parsed["scheme"]
        except ValueError:
            raise ValueError(f"{url!r} is not a STUN/TURN URL (stun:HOST[:PORT] or turn:HOST[:PORT]"
                             "[?transport=udp|tcp])") from None
        server = {"urls": url}
        if scheme.startswith("turn"):
            if not (username and credential):
                raise ValueError(f"{url!r} is a TURN server: give --turn-user and --turn-password")
            server.update(username=username, credential=credential)
        servers.append(server)
    return servers


def rtc_configuration(ice_servers: list[dict] | None):
    """aiortc's RTCConfiguration for ``ice_servers`` (None or []: host candidates only, nothing leaves the host)."""
    from aiortc import RTCConfiguration, RTCIceServer

    return RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers or ()])
