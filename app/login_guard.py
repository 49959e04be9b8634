"""Login throttling: a lockout per user and client address after repeated wrong passwords.

Gradio's login route calls `auth(username, password)` with nothing else, and as fast as it is
asked (measured: 549 wrong passwords per second). `ClientAddress`, ASGI middleware in front of
Gradio, records each request's client address in a context variable that the auth callable
(`AppContext.check_password`) reads; `LoginThrottle` counts failures per (user, address).

Rule: FREE_FAILURES wrong passwords in a row are free; each further one locks that user from
that address for 1 s, then 2, 4, ... up to MAX_LOCK_S. While locked every attempt fails, even
the right password, and is not counted. A success clears the count. Keyed by address too, so
an attacker elsewhere cannot lock a user out (behind a proxy every client shares the proxy's
address: then the lockout is per user). The auth callable runs on the server's event loop, so
this refuses at once instead of sleeping.
"""
from __future__ import annotations

import contextvars
import ipaddress
import threading
import time
from collections import OrderedDict

from starlette.middleware import Middleware

FREE_FAILURES = 5
MAX_LOCK_S = 300.0
FORGET_S = 3600.0  # a failure count idle this long starts again from zero
MAX_KEYS = 10000  # memory bound under a spray of made-up user names

client_address: contextvars.ContextVar[str] = contextvars.ContextVar("client_address",
                                                                     default="?")


class LoginThrottle:
    def __init__(self, clock=time.monotonic, free: int = FREE_FAILURES,
                 max_lock_s: float = MAX_LOCK_S):
        self.clock, self.free, self.max_lock_s = clock, free, max_lock_s
        self._failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def locked_for(self, user: str, address: str) -> float:
        """Seconds this user must still wait from this address (0: may try now)."""
        with self._lock:
            count, last = self._failures.get((user, address), (0, 0.0))
            return max(0.0, last + self._lock_s(count) - self.clock())

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            count, last = self._failures.pop((user, address), (0, now))
            if now - last > FORGET_S:
                count = 0
            self._failures[(user, address)] = (count + 1, now)
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)  # the longest idle

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._failures.pop((user, address), None)

    def _lock_s(self, count: int) -> float:
        if count < self.free:
            return 0.0
        return min(self.max_lock_s, 2.0 ** (count - self.free))


class ClientAddress:
    """ASGI middleware: the request's client address into `client_address` for its handlers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            client_address.set(client[0] if client else "?")
        await self.app(scope, receive, send)


def with_client_address(app_kwargs: dict | None) -> dict:
    """FastAPI keyword arguments for Gradio's app with ClientAddress added to its middleware."""
    app_kwargs = dict(app_kwargs or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", ()), Middleware(ClientAddress)]
    return app_kwargs


def is_loopback(host: str) -> bool:
    """Only this machine can reach a server bound here (a host name may resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
