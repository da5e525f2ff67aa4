"""The SSRF guard: which addresses a fetch on a user's behalf may reach (LoRA downloads, input
images, webhooks), and connections made only to those.

A host is resolved once per request (per redirect hop); every address it resolves to is judged,
and the connection is opened to one of those very addresses (never resolved again, so DNS
rebinding between the check and the connection cannot happen). For https the TLS server name
(SNI) and the certificate check stay on the hostname; the Host header carries the hostname.

An address is allowed when it is globally routable (not loopback, private, link-local, shared
(CGNAT), reserved, multicast or a cloud metadata address). IPv6 forms that carry an IPv4 address
(IPv4-mapped, -translated and -compatible, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32)
are judged by the IPv4 addresses inside them; the local-use NAT64 prefix 64:ff9b:1::/48, the
deprecated site-local fec0::/10 and the cloud metadata addresses that are globally routable
(Azure's wire server 168.63.129.16) are never allowed. A host that does not resolve gets the same
answer as a private one, so that the answers do not map internal names.

Escapes: `ALLOWED_PRIVATE_ORIGINS` (comma-separated `scheme://host:port`) names the operator's own
private services, reachable by every kind of fetch; `trusted=True` (for a hop to an endpoint the
deployment configured, see loras.sites) skips judging for that hop only; `LORA_ALLOW_PRIVATE_URLS=1`
(development only) turns judging off for LoRA downloads.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.connection import HTTPConnection, HTTPSConnection

from errors import UserError

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
# Metadata and platform services that are globally routable addresses, so that is_global misses them.
_PUBLIC_METADATA = frozenset({ipaddress.ip_address("168.63.129.16")})
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def redact(url: str) -> str:
    """A URL fit for logs and errors: no query string, no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a port that is not a number
        pass
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def origin(url: str) -> str:
    """scheme://host:port of a URL, lower-cased, with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address tunnels to (None: not a tunnelled form)."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # (server, client)
    if address in _NAT64 or address in _IPV4_TRANSLATED or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return None


def is_public(address: str | IPAddress) -> bool:
    """Whether a fetch on a user's behalf may connect to `address` (see the module's docstring)."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if address in _PUBLIC_METADATA or (address.version == 6 and (address in _NAT64_LOCAL or address in _SITE_LOCAL)):
        return False
    inner = embedded_ipv4(address)
    if inner is not None:
        return all(is_public(a) for a in inner)
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    """A checked place to connect to: the URL's host, and the addresses it was judged by."""

    scheme: str
    host: str  # the hostname (IDNA-encoded), for SNI, the certificate check and the Host header
    port: int
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class Guard:
    """Judges a URL's addresses (`check`) and opens connections only to them (`connection`)."""

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        allow_private: bool = False,
        allowed_origins: frozenset[str] = frozenset(),
    ):
        self.resolver = resolver or resolve_host
        self.allow_private = allow_private
        self.allowed_origins = allowed_origins

    @classmethod
    def from_env(cls, resolver: Resolver | None = None, *, loras: bool = False) -> Guard:
        """The guard the settings describe: ALLOWED_PRIVATE_ORIGINS for every fetch, and for LoRA
        downloads (`loras`) also LORA_ALLOW_PRIVATE_URLS."""
        allow = loras and os.environ.get("LORA_ALLOW_PRIVATE_URLS", "").strip().lower() in ("1", "true", "yes")
        return cls(resolver, allow_private=allow, allowed_origins=allowed_private_origins())

    def check(self, url: str, *, trusted: bool = False) -> Target:
        """Resolve the URL's host once and judge every address; UserError if any is not allowed."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"Refusing to fetch {redact(url)!r}: only http(s) URLs are allowed.")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            host = parts.hostname.encode("idna").decode("ascii")
        except (ValueError, UnicodeError):
            raise UserError(f"Refusing to fetch {redact(url)!r}: its host or port is malformed.") from None
        try:
            addresses = [str(ipaddress.ip_address(host))]  # a literal address: nothing to resolve
        except ValueError:
            try:
                addresses = list(self.resolver(host, port))
            except (OSError, UnicodeError):
                addresses = []
        if not addresses:  # the same answer as for a private host: no mapping of internal names
            raise _refused(url)
        trusted = trusted or self.allow_private or origin(url) in self.allowed_origins
        if not trusted and not all(self._public(a) for a in addresses):
            raise _refused(url)
        return Target(scheme, host, port, tuple(addresses))

    def _public(self, address: str) -> bool:
        try:
            return is_public(address)
        except ValueError:  # a resolver answer that is not an address
            return False

    @staticmethod
    def connection(target: Target, address: str, timeout: float, ca_certs: str) -> HTTPConnection:
        """An unconnected urllib3 connection to `address` (one of `target.addresses`), verifying TLS
        against the hostname. Send the request with `headers["Host"] = target.host_header`."""
        if address not in target.addresses:
            raise AssertionError("connections go to checked addresses only")
        if target.scheme == "https":
            return HTTPSConnection(
                address,
                target.port,
                timeout=timeout,
                server_hostname=target.host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=ca_certs,
            )
        return HTTPConnection(address, target.port, timeout=timeout)


def _refused(url: str) -> UserError:
    return UserError(
        f"Refusing to fetch {redact(url)!r}: its host is not a public Internet address (private, loopback, "
        "link-local and metadata addresses, and names that do not resolve, are refused)."
    )


def allowed_private_origins(value: str | None = None) -> frozenset[str]:
    """ALLOWED_PRIVATE_ORIGINS, normalised (`origin`); RuntimeError (the operator's to fix) for an entry
    that is not scheme://host[:port]."""
    value = os.environ.get("ALLOWED_PRIVATE_ORIGINS", "") if value is None else value
    origins = set()
    for entry in filter(None, (e.strip() for e in value.split(","))):
        parts = urlsplit(entry)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise RuntimeError(f"ALLOWED_PRIVATE_ORIGINS: {entry!r} is not scheme://host[:port]")
        origins.add(origin(entry))
    return frozenset(origins)
