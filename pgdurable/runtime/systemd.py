"""sd_notify over $NOTIFY_SOCKET, without a dependency. A no-op outside systemd."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None):
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self._addr = addr or None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *lines: str) -> bool:
        """Send ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1``…; True if sent
        (or outside systemd), False if dropped (errors are not raised).

        Never blocks: when the receiver's queue is full (a datagram socket holds as few as
        10 messages, ``net.unix.max_dgram_qlen``), the message is dropped rather than the
        supervisor stopped; the caller sends again at its next tick.
        """
        if self._addr is None:
            return True
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
