"""Bounded waits: every wait for something outside this process (an MLflow server, a Ray
cluster) has a limit, says what it waits for while it waits, and ends in an error naming it."""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a command waits for a server that does not answer before it says so and stops: long
# enough for a server being (re)started, short against the minutes a client's own retries take.
SERVER_WAIT_S = 20.0


class NoAnswer(ConnectionError):
    """What was waited for did not answer within its bound."""


def wait_for(what: str, attempt: Callable[[float], T], within_s: float = SERVER_WAIT_S, every_s: float = 1.0,
             retry_on: type[Exception] = OSError) -> T:  # fmt: skip
    """``attempt(timeout_s)`` until it returns, for at most ``within_s`` seconds; a ``retry_on``
    error (by default an ``OSError``: refused, unreachable, timed out) means try again. Says once
    that it waits, and for what; :class:`NoAnswer` with the last error when the time is up."""
    deadline = time.monotonic() + within_s
    said = False
    while True:
        try:
            return attempt(max(0.1, min(5.0, deadline - time.monotonic())))
        except retry_on as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
            if time.monotonic() + every_s >= deadline:
                raise NoAnswer(f"no answer in {within_s:g} s ({reason})") from None
            if not said:
                log.warning("waiting for %s (up to %g s): %s", what, within_s, reason)
                said = True
            time.sleep(every_s)


def listening(address: str, default_port: int) -> Callable[[float], None]:
    """An attempt for :func:`wait_for`: connect to the host and port of ``address`` (a URL, or
    ``host:port``) and hang up."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname or "localhost", parts.port or default_port
    except ValueError as e:  # a port that is no number, or out of range
        raise NoAnswer(f"{address} is no address ({e})") from None

    def attempt(timeout_s: float) -> None:
        socket.create_connection((host, port), timeout=timeout_s).close()

    return attempt
