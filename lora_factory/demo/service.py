"""The demo booru as a per-process service, so the embedded default needs nothing running."""

from __future__ import annotations

import threading

from lora_factory.demo.booru import DemoBooru, DemoBooruServer

_lock = threading.Lock()
_server: DemoBooruServer | None = None


def demo_booru_url() -> str:
    """Start the demo booru on a free loopback port once per process; return its URL."""
    global _server
    with _lock:
        if _server is None:
            server = DemoBooruServer(DemoBooru(seed=0))
            server.start()
            _server = server
        return _server.url
