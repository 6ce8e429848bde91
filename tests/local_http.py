"""One local HTTP server for the tests that download (127.0.0.1 only, never the network).

Handler threads are joined when the server closes, and a client that hangs up early (a test of timeouts or of an
interrupted download) is not an error: otherwise the handler's BrokenPipe traceback is printed later, from its
thread, into whichever test runs at that moment."""
from __future__ import annotations

import contextlib
import http.server
import sys
import threading
from collections.abc import Iterator
from typing import Any


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close (block_on_close), so none outlives its test
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client went away: expected in these tests
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(handler: Any) -> Iterator[str]:
    """Serve ``handler`` on a free port of 127.0.0.1; yields the base URL; stops and joins every thread on exit."""
    httpd = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
