"""Admission: who may connect, under which address, and whose sessions they may use.

Every connection of every interface (WebSocket, HTTP, Wyoming) is counted once
here, however many requests it carries, against ``--max-connections`` and
``--max-connections-per-address``; a draining server admits no one.  When a
connection closes, ``release`` frees its place and tells the parts that keep
work for it (the shared model threads drop what it left waiting).
"""

from __future__ import annotations

from typing import Callable, Hashable

from ..engines.errors import ErrorCode, Refusal
from .security import ConnectionLimits, Gate, ProxyTrust
from .sessions import owner_of


class Admission:
    def __init__(self, gate: Gate | None = None, trusted_proxies: tuple[str, ...] = (), max_connections: int = 256,
                 max_connections_per_address: int = 16) -> None:
        self.gate = gate or Gate()
        self.proxies = ProxyTrust(trusted_proxies)
        self.limits = ConnectionLimits(max_connections, max_connections_per_address)
        self.draining = False
        self._admitted: dict[Hashable, str] = {}  # connection -> the address it is counted under
        self._on_release: list[Callable[[Hashable], None]] = []

    def admit(self, connection: Hashable, address: str) -> None:
        """Count ``connection`` under ``address`` (``release`` it when it closes), or raise the ``Refusal`` its
        interface answers before closing it."""
        if connection in self._admitted:
            return
        if self.draining:
            raise Refusal(ErrorCode.SHUTTING_DOWN, "The server is shutting down")
        refusal = self.limits.admit(address)
        if refusal is not None:
            raise Refusal(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
        self._admitted[connection] = address

    def on_release(self, hook: Callable[[Hashable], None]) -> None:
        """Call ``hook(connection)`` whenever a connection closes (to drop the work it left waiting)."""
        self._on_release.append(hook)

    def release(self, connection: Hashable) -> None:
        address = self._admitted.pop(connection, None)
        if address is not None:
            self.limits.release(address)
        for hook in self._on_release:
            hook(connection)

    def admitted(self, connection: Hashable) -> bool:
        return connection in self._admitted

    @property
    def open_connections(self) -> int:
        return len(self._admitted)

    def owner(self, headers, target: str) -> str:
        """Whose sessions a request may use: the hash of the API key it offers; on a server without keys, one
        owner for all (a key a client sends anyway does not split them)."""
        return owner_of(self.gate.offered_key(headers, target) if self.gate.requires_key else None)

    def counted_as(self, owner: str, address: str) -> str:
        """Whose share of the sessions (``max_sessions_per_owner``) a new session takes: its key's; on a server
        without keys, where everyone is one owner, its client address's (hashed, never stored as it is)."""
        return owner if self.gate.requires_key else owner_of(f"address {address}")
