"""A real HTTP receiver on loopback for what the pipeline sends out (Sentry events, alert
webhooks): it records every request body and answers with the statuses it is given."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    url: str
    """http://127.0.0.1:<port>"""
    bodies: list[bytes] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)


@contextmanager
def http_receiver(statuses: tuple[int, ...] = ()) -> Iterator[Received]:
    """Serve until the block ends. The first requests get `statuses` in turn (e.g. (500,) for
    a receiver that fails once), the rest 200; every body is kept, failed ones included."""
    pending = list(statuses)
    lock = threading.Lock()
    received = Received("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            with lock:
                status = pending.pop(0) if pending else 200
                received.bodies.append(body)
                received.answered.append(status)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
