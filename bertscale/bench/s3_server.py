"""A real S3 API on 127.0.0.1 (moto's server) that counts, throttles and breaks object reads.

Used by `bertscale bench remote` and by tests/test_remote.py; it needs the test extra
(``moto[server]``). The S3 implementation is moto's, unchanged; a WSGI layer in front of it

- counts GET requests and body bytes served per object key (``gets``, ``served``), so a test can
  see how often each shard was downloaded;
- throttles object bodies to a shared link of ``bandwidth`` bytes/s with ``latency`` seconds
  before the first byte of each response (a benchmark's model of a node's network);
- cuts the next GET of a chosen key after a share of its body (``cut_next``): the connection
  closes mid-transfer, as when a download is killed midway.

It listens on 127.0.0.1 only and serves until `stop()`. `env()` gives the environment a client
needs (dummy credentials: moto accepts any).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Iterable


class LocalS3:
    def __init__(self, bandwidth: float = 0.0, latency: float = 0.0):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

        self.app = DomainDispatcherApplication(create_backend_app)
        self.bandwidth = bandwidth
        self.put_bandwidth = 0.0  # bytes/s of uploads (PUT/POST bodies), 0: unthrottled
        self.latency = latency
        self.gets: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self._cuts: dict[str, float] = {}
        self.active = 0  # object bodies being sent
        self._lock = threading.Lock()
        self._link_free = 0.0  # when the shared, throttled link is next idle
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.port = self.server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bertscale-test",
                "AWS_SECRET_ACCESS_KEY": "bertscale-test", "AWS_DEFAULT_REGION": "us-east-1"}

    def cut_next(self, key: str, share: float = 0.5) -> None:
        """The next GET of `key` (bucket/key, no leading slash) stops after `share` of its body."""
        with self._lock:
            self._cuts[key] = share

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no object body is being sent (a killed client's responses stop at the next
        write that fails)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)

    def reset_counts(self) -> None:
        with self._lock:
            self.gets.clear()
            self.served.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the WSGI layer ---------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        key = environ.get("PATH_INFO", "").lstrip("/")
        is_read = environ["REQUEST_METHOD"] == "GET" and "/" in key and not environ.get("QUERY_STRING")
        if self.put_bandwidth and environ["REQUEST_METHOD"] in ("PUT", "POST"):
            # A slow link up: the request's body takes its length / put_bandwidth to arrive.
            time.sleep(int(environ.get("CONTENT_LENGTH") or 0) / self.put_bandwidth)
        body = self.app(environ, start_response)
        if not is_read:
            return body
        with self._lock:
            self.gets[key] += 1
            cut = self._cuts.pop(key, None)
        return self._stream(key, body, cut)

    def _stream(self, key: str, body: Iterable[bytes], cut: float | None) -> Iterable[bytes]:
        with self._lock:
            self.active += 1
        try:
            data = b"".join(body)
            if self.latency:
                time.sleep(self.latency)
            limit = len(data) if cut is None else int(len(data) * cut)
            step = 1 << 16
            for pos in range(0, limit, step):
                chunk = data[pos:min(pos + step, limit)]
                if self.bandwidth:
                    with self._lock:
                        begin = max(time.monotonic(), self._link_free)
                        self._link_free = begin + len(chunk) / self.bandwidth
                        done = self._link_free
                    time.sleep(max(0.0, done - time.monotonic()))
                with self._lock:
                    self.served[key] += len(chunk)
                yield chunk
            if cut is not None:
                raise ConnectionAbortedError(f"cut {key} after {limit} of {len(data)} bytes")
        finally:
            with self._lock:
                self.active -= 1
