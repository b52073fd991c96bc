"""The systemd notify protocol (sd_notify(3)), spoken from the event loop.

systemd passes `$NOTIFY_SOCKET` (a datagram socket: a path, or `@name` in
the abstract namespace) to a `Type=notify`/`notify-reload` service and, with
`WatchdogSec=`, `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process it means).
The supervisor owns one `Notifier` and decides what to say:

- `ready()` once every registry synced or was restored (the /readyz rule);
- `reloading()` on SIGHUP (`RELOADING=1` with `MONOTONIC_USEC`, the time the
  reload began, as `Type=notify-reload` requires), then `ready()` once the
  new config is applied or rejected;
- `status(text)` for `systemctl status`;
- `stopping()` on SIGTERM;
- `watchdog()`: a coroutine the supervisor runs in its TaskGroup, sending
  `WATCHDOG=1` every half `WATCHDOG_USEC`. It runs on the event loop, so a
  loop that stops turning stops the pings and systemd restarts the service.

Without `$NOTIFY_SOCKET` every call is a no-op. Sends never block the loop
(a non-blocking socket); a send that fails is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("discoveryd.sdnotify")


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports are not spoken here


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Messages to the service manager; state is the socket and the watchdog interval, read once from `environ`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        self.watchdog_interval: float | None = None
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC); None: no watchdog."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self._address and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; True when it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(payload, self._address)
        except OSError as e:
            log.warning("sd_notify %s failed: %s", fields[0].partition("=")[0], e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the config")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 every `watchdog_interval` until cancelled; returns at once without a watchdog."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    """A field value ends at a newline: the protocol would read the rest as fields of its own."""
    return text.replace("\r", " ").replace("\n", " ")
