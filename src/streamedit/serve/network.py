"""Where the server may be reached and by whom: loopback checks, access tokens, and the addresses WebRTC media uses.

Without a token the server answers on loopback only (serve/server.py refuses other Host headers). ``ice_hosts``
limits the addresses ICE gathers on; when they are all loopback the browser's other candidates are dropped too.
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
