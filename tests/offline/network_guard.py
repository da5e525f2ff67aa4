"""No outside network for tests: connections and name lookups other than loopback fail at once.

Installed in the pytest process by tests/conftest.py and in every Python process a test starts by
tests/offline/sitecustomize.py (conftest puts tests/offline first on PYTHONPATH, and
tests/cog_server.py keeps it there for the Cog server and its worker). It patches Python's socket
module only: a process that is not Python, or that clears PYTHONPATH, is not covered (coglet's Rust
side is only ever given loopback URLs by the tests).
"""

from __future__ import annotations

import ipaddress
import socket

MESSAGE = "tests are offline"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _loopback_name(host) -> bool:
    """A name that needs no DNS: none (a bind), an IP address (checked on connect), or loopback."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).rstrip(".").lower()
    return host in ("", "<broadcast>") or _is_ip(host) or host in LOOPBACK_NAMES or host.endswith(".localhost")


def _check_address(sock, address) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = _loopback_name(host)
    if not loopback:
        raise ConnectionRefusedError(f"{MESSAGE}: refused a connection to {host}")


def _refuse_lookup(host) -> None:
    raise socket.gaierror(socket.EAI_NONAME, f"{MESSAGE}: refused to look up {host}")


def install() -> None:
    """Patch the socket module of this process (idempotent)."""
    if getattr(socket, "_offline_guard", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    getaddrinfo, gethostbyname, gethostbyname_ex = socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex
    gethostbyaddr = socket.gethostbyaddr

    def guarded_connect(self, address):
        _check_address(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _check_address(self, address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _loopback_name(host):
            _refuse_lookup(host)
        return getaddrinfo(host, *args, **kwargs)

    def guarded_gethostbyname(host):
        if not _loopback_name(host):
            _refuse_lookup(host)
        return gethostbyname(host)

    def guarded_gethostbyname_ex(host):
        if not _loopback_name(host):
            _refuse_lookup(host)
        return gethostbyname_ex(host)

    def guarded_gethostbyaddr(address):
        loopback = ipaddress.ip_address(address).is_loopback if _is_ip(address) else _loopback_name(address)
        if not loopback:
            _refuse_lookup(address)
        return gethostbyaddr(address)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
    socket.gethostbyname = guarded_gethostbyname
    socket.gethostbyname_ex = guarded_gethostbyname_ex
    socket.gethostbyaddr = guarded_gethostbyaddr
    socket._offline_guard = True
