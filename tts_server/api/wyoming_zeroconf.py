"""Home Assistant finds a Wyoming server over zeroconf (mDNS, ``_wyoming._tcp``): ``--wyoming-zeroconf``."""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)


async def announce(uri: str, name: str):
    """Announce the Wyoming service over mDNS (``_wyoming._tcp``) so Home Assistant discovers it.

    A URI bound to one address announces that address on that interface only;
    ``0.0.0.0`` announces the address of the interface that reaches the LAN.
    """
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    parsed = urlparse(uri)
    if parsed.scheme != "tcp" or parsed.port is None:
        raise ValueError("--wyoming-zeroconf needs a tcp:// Wyoming URI")
    host = parsed.hostname or "0.0.0.0"
    interfaces = [host] if host not in ("0.0.0.0", "") else None
    if interfaces is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("224.0.0.251", 5353))  # no packet is sent: this only picks the outgoing interface
            host = probe.getsockname()[0]
    zeroconf = AsyncZeroconf(interfaces=interfaces or "All", ip_version=IPVersion.V4Only)
    service = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.",
                               addresses=[socket.inet_aton(host)], port=parsed.port)
    await zeroconf.async_register_service(service)
    log.info("Wyoming announced over zeroconf as %r at %s:%d", name, host, parsed.port)
    return zeroconf
