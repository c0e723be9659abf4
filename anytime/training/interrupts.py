"""Ctrl-C handling around writes that must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def defer_keyboard_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (main thread only), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        # signal.signal works only in the main thread; elsewhere Ctrl-C is not delivered anyway.
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt
