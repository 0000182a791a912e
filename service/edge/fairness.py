"""A fair share of the connection cap (issue 20): one client cannot shut the others out.

The cap (`max_connections`) is global, and a connection counts against it whether it is busy or
idle, so 1,050 idle sockets from one client gave everyone else 503 until they timed out, and
1,000 kept-alive ones each sending a request every few seconds did so for as long as they went
on. So, per server process:

- **Idle connections go first.** Once the open connections pass `HIGH_WATER` of the cap, the
  ones idle longest (kept alive between requests, or never used) are closed until `LOW_WATER`
  of the cap is open, making room for new clients. A connection with a request in progress is
  never closed here, nor one whose request the kernel holds and the loop has not read yet (it
  looks idle: connections accepted in the same turn are all opened before any of them is read).
  (A client may see its kept-alive connection closed, as it may at uvicorn's keep-alive timeout:
  HTTP clients then reconnect.)
- **A share per peer address.** A connection opened while its peer address already holds
  `per_client` connections is past the peer's share: it is the first to be closed when room is
  made, and while the cap is near its requests get the JSON 503 (`too_many_connections`). Below
  `HIGH_WATER` nobody is refused for the share.
- **Behind a proxy** every client has the proxy's address: list it in `proxy_addresses`, so its
  connections are exempt from the share (the proxy then limits its clients, e.g. HAProxy's
  `maxconn` and `sc_conn_cur`). The default share is half the cap, so an unlisted proxy still
  gets half of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

HIGH_WATER = 0.9  # of the cap: past it, room is made
LOW_WATER = 0.8  # of the cap: what making room closes down to


class ConnectionShare:
    """Open connections per peer address and in order of idleness, for one server process's protocols
    (`LimitedHttpProtocol`); every method runs on the event loop, in O(1) but for the connections closed."""

    def __init__(self, cap: int, per_client: int, proxy_addresses: Iterable[str] = ()) -> None:
        self.cap = cap
        self.per_client = per_client
        self.exempt = frozenset(proxy_addresses)
        self.peer_of: dict[Any, str | None] = {}  # open connection -> its peer address
        self.per_peer: Counter[str | None] = Counter()
        self.over_share: set[Any] = set()
        # idle connections, longest idle first (dicts keep insertion order): past their share, then the others
        self.idle_over: dict[Any, None] = {}
        self.idle_within: dict[Any, None] = {}
        self.closing: set[Any] = set()  # closed to make room, not yet lost

    def opened(self, protocol: Any) -> None:
        self._make_room()
        peer = protocol.client[0] if protocol.client else None
        self.peer_of[protocol] = peer
        self.per_peer[peer] += 1
        if peer not in self.exempt and self.per_peer[peer] > self.per_client:
            self.over_share.add(protocol)
        self.idle(protocol)

    def closed(self, protocol: Any) -> None:
        if protocol not in self.peer_of:
            return
        peer = self.peer_of.pop(protocol)
        self.per_peer[peer] -= 1
        if not self.per_peer[peer]:
            del self.per_peer[peer]
        self.busy(protocol)
        self.over_share.discard(protocol)
        self.closing.discard(protocol)

    def busy(self, protocol: Any) -> None:
        """A request is under way on the connection."""
        self.idle_over.pop(protocol, None)
        self.idle_within.pop(protocol, None)

    def idle(self, protocol: Any) -> None:
        """The connection has answered everything it was sent (or was just opened) and waits."""
        if protocol in self.peer_of and protocol not in self.closing:
            self.busy(protocol)
            (self.idle_over if protocol in self.over_share else self.idle_within)[protocol] = None

    def over(self, protocol: Any) -> bool:
        """Refuse this connection's request: it is past its peer's share and the cap is near."""
        return protocol in self.over_share and self.open > HIGH_WATER * self.cap

    @property
    def open(self) -> int:
        """Open connections, less those closed to make room (they are lost a moment later)."""
        return len(self.peer_of) - len(self.closing)

    def _make_room(self) -> None:
        if self.open <= HIGH_WATER * self.cap:
            return
        for order in (self.idle_over, self.idle_within):
            while order and self.open > LOW_WATER * self.cap:
                protocol = next(iter(order))
                del order[protocol]
                if protocol.request_waiting():  # its request is in and unread: busy, not idle
                    continue
                self.closing.add(protocol)
                protocol.transport.close()
