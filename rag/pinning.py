"""Connections pinned to addresses that were already checked, and a watchdog for the total deadline.

requests/urllib3 normally resolve the host name again when they connect, which is what DNS rebinding
exploits: the check sees a public address, the connection gets a private one. Here the connection classes
never resolve anything: they dial one of the addresses handed to them, while the request keeps the host
name for the Host header, TLS SNI and certificate verification.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Sequence
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from rag.addresses import IPAddress


class Pin:
    """The checked addresses one request may dial, and the sockets it opened (so they can be aborted)."""

    def __init__(self, addresses: Sequence[IPAddress], connect_timeout: float):
        self.addresses = list(addresses)
        self.connect_timeout = connect_timeout
        self.dialled: list[IPAddress] = []
        self._sockets: list[socket.socket] = []
        self._aborted = False
        self._lock = threading.Lock()

    def connect(self, port: int, socket_options: Sequence[tuple] | None) -> socket.socket:
        """Open a TCP connection to the first checked address that answers; never a DNS lookup."""
        error: OSError = OSError("no address to connect to")
        for address in self.addresses:
            if self._aborted:
                raise TimeoutError("the total time limit passed while connecting")
            self.dialled.append(address)
            try:
                sock = socket.create_connection((str(address), port), self.connect_timeout)
            except OSError as exc:
                error = exc
                continue
            for option in socket_options or ():
                sock.setsockopt(*option)
            self._register(sock)
            return sock
        raise error

    def _register(self, sock: socket.socket) -> None:
        """Remember a socket so ``abort`` can cut it; refuse it when the deadline already passed."""
        with self._lock:
            if self._aborted:
                sock.close()
                raise TimeoutError("the total time limit passed while connecting")
            self._sockets.append(sock)

    def abort(self) -> None:
        """Shut the sockets down from another thread: a blocked read then fails at once."""
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _PinnedMixin:
    """Replaces urllib3's resolve-and-connect step with a connection to the pinned addresses."""

    def __init__(self, *args: Any, pin: Pin, **kwargs: Any):
        self._pin = pin
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        """Dial a checked address; errors are translated the way urllib3's own ``_new_conn`` does."""
        try:
            return self._pin.connect(self.port, self.socket_options)  # type: ignore[attr-defined]
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from exc  # type: ignore
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore


class _PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection  # type: ignore[assignment]


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose connections go to ``pin``'s addresses whatever the URL's host resolves to."""

    def __init__(self, pin: Pin):
        self.pin = pin
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        """Build the usual pool manager, with pools whose connections carry the pin."""
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": functools.partial(_PinnedHTTPPool, pin=self.pin),
            "https": functools.partial(_PinnedHTTPSPool, pin=self.pin),
        }

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        """Proxies would connect elsewhere than the checked address, so they are never used."""
        raise ValueError("proxies are not used by the safe fetcher")


class Watchdog:
    """Aborts every pinned connection of one fetch when its total time limit passes (slow-drip servers)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._pins: list[Pin] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        self._timer.join()

    def watch(self, pin: Pin) -> None:
        """Put one more request's connections under the deadline."""
        with self._lock:
            self._pins.append(pin)
            expired = self.expired
        if expired:
            pin.abort()

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            pins = list(self._pins)
        for pin in pins:
            pin.abort()
