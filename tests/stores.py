"""The three object stores the tests run against, each a real server on 127.0.0.1:

- S3: moto's server (`bertscale.bench.s3_server.LocalS3`, which counts, throttles and cuts reads
  and throttles uploads in a WSGI layer of its own);
- GCS: `gcp-storage-emulator` (PyPI, the test extra), started as its own process;
- Azure Blob: Azurite (npm), installed on first use into ``.cache/azurite`` of the repository
  (git-ignored; `make test` installs it first through ``make azurite``).

GCS and Azure sit behind `MeteredProxy`, a small HTTP proxy that gives them LocalS3's metering:
bytes served per object, a throttled link down and up (`bandwidth`, `put_bandwidth`), and a
transfer cut midway, and writes denied (`deny_writes`: the store's own 403, what a revoked or
expired credential gets; neither emulator enforces permissions, so the proxy stands in for the
store's access check). Otherwise the proxy forwards every request unchanged; the store
semantics are the emulator's.

A test reaches a store through `Store`: its scheme, a bucket of its own, and the environment a
user sets to point bertscale at that store (the same variables, documented in docs/data.md).

    python tests/stores.py --install-azurite     # what `make azurite` runs
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
KINDS = ("s3", "gs", "az")

# 3.35.0: the newest release whose declared engines take Node 20 (3.36 wants 21, 3.37 22).
AZURITE_VERSION = "3.35.0"
AZURITE_DIR = REPO / ".cache" / "azurite"
AZURITE_BIN = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (published in its README and Microsoft's docs).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def _azurite_installed() -> bool:
    import json
    try:
        package = json.loads((AZURITE_DIR / "node_modules" / "azurite" / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return package.get("version") == AZURITE_VERSION and AZURITE_BIN.exists()


def install_azurite() -> Path:
    """Azurite's blob server at the pinned version, `npm install`ed once into .cache/azurite
    (under a lock: two test workers may ask at once). Raises RuntimeError when npm is missing or
    the install fails."""
    if _azurite_installed():
        return AZURITE_BIN
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: Azurite (the Azure Blob emulator) installs through "
                           "npm (apt-get install npm)")
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    with open(AZURITE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _azurite_installed():
            r = subprocess.run([npm, "install", "--prefix", str(AZURITE_DIR), "--no-audit",
                                "--no-fund", "--no-save", "--loglevel=error",
                                f"azurite@{AZURITE_VERSION}"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode or not _azurite_installed():
                raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed "
                                   f"(exit {r.returncode}):\n{r.stderr[-2000:]}")
    return AZURITE_BIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the metering proxy ----------------------------------------------------------------------

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length"}


class MeteredProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of a store emulator, with LocalS3's metering:
    `gets` / `served` count object reads and body bytes per ``bucket/key`` (`object_key` tells an
    object read from the rest), `bandwidth` throttles the bodies of object reads (responses) on
    one shared link down, and `cut_next` closes the connection after a share of the next read of
    a key. `put_bandwidth` (bytes/s, 0: unthrottled; LocalS3's name) throttles what clients send:
    every request body (PUT/POST/PATCH: GCS simple, multipart and resumable uploads, Azure blob
    and block puts, commits) is read from the client at that rate on one shared link up, and only
    a body that arrived whole is sent on, so a client killed mid-upload leaves the emulator
    nothing of that request, as a real store. Responses are read whole from the emulator first
    (shards here are small), so a slow client never holds a single-threaded emulator up;
    `upstream_slots` bounds the requests sent to it at once."""

    def __init__(self, upstream_port: int, object_key: Callable[[str, str, str], str | None],
                 upstream_slots: int = 8):
        self.upstream_port = upstream_port
        self.object_key = object_key
        self.bandwidth = 0.0
        self.put_bandwidth = 0.0
        self.gets: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.active = 0
        self._cuts: dict[str, float] = {}
        self._denied: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(upstream_slots)
        self._link_free = 0.0
        self._up_free = 0.0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def cut_next(self, key: str, share: float = 0.5) -> None:
        """The next read of `key` (bucket/key) stops after `share` of its body."""
        with self._lock:
            self._cuts[key] = share

    def deny_writes(self, pattern: str | None) -> None:
        """Writes (PUT, POST, PATCH) of an object whose name matches `pattern` (a regex searched in
        the request's unquoted target and the start of its body, where GCS uploads name their
        object) are answered with the store's 403; None lets every write through again."""
        with self._lock:
            self._denied = re.compile(pattern) if pattern else None

    # The store's answer to a write its credential may not make (GcsEmulator: GCS's own).
    DENIED: tuple[dict[str, str], bytes] = ({"Content-Type": "text/plain"}, b"Forbidden")

    def reset_counts(self) -> None:
        with self._lock:
            self.gets.clear()
            self.served.clear()

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pace(self, n: int, rate: float, up: bool) -> None:
        """Sleep until `n` more bytes have crossed the shared link (up or down) at `rate`."""
        with self._lock:
            free = self._up_free if up else self._link_free
            done = max(time.monotonic(), free) + n / rate
            if up:
                self._up_free = done
            else:
                self._link_free = done
        time.sleep(max(0.0, done - time.monotonic()))

    def _read(self, h: http.server.BaseHTTPRequestHandler, n: int) -> bytes:
        """`n` bytes of the request body, at `put_bandwidth` when set; a client that goes away
        first (a short read) raises ConnectionError, so nothing of the request is sent on."""
        out = bytearray()
        while len(out) < n:
            want = min(1 << 16, n - len(out))
            if self.put_bandwidth:
                self._pace(want, self.put_bandwidth, up=True)
            chunk = h.rfile.read(want)
            if not chunk:
                raise ConnectionError(f"the client sent {len(out)} of {n} body bytes")
            out += chunk
        return bytes(out)

    def _body(self, h: http.server.BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = h.rfile.readline()
                if not line:
                    raise ConnectionError("the client went away mid-body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline().strip():  # trailers
                        pass
                    return bytes(out)
                out += self._read(h, size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return self._read(h, n) if n else b""

    def _forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        try:
            self._exchange(h)
        except (ConnectionError, TimeoutError):  # the client went away (a killed job)
            h.close_connection = True

    def _exchange(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = self._body(h)
        if self._denied is not None and h.command in ("PUT", "POST", "PATCH"):
            target = urllib.parse.unquote(h.path) + "\n" + body[:65536].decode("latin-1")
            if self._denied.search(target):
                said, text = self.DENIED
                h.send_response(403, "Forbidden")
                for k, v in said.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(text)))
                h.end_headers()
                h.wfile.write(text)
                return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if body or h.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        with self._slots:
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, reason, out_headers = resp.status, resp.reason, resp.getheaders()
            finally:
                conn.close()
        path, _, query = h.path.partition("?")
        key = self.object_key(h.command, path, query) if status in (200, 206) else None
        h.send_response(status, reason)
        for k, v in out_headers:
            if k.lower() not in _HOP:
                h.send_header(k, v)
        if h.command == "HEAD":
            length = dict((k.lower(), v) for k, v in out_headers).get("content-length", "0")
            h.send_header("Content-Length", length)
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if key is None:
            h.wfile.write(data)
            return
        with self._lock:
            self.gets[key] += 1
            cut = self._cuts.pop(key, None)
            self.active += 1
        try:
            limit = len(data) if cut is None else int(len(data) * cut)
            for pos in range(0, limit, 1 << 16):
                chunk = data[pos:min(pos + (1 << 16), limit)]
                if self.bandwidth:
                    self._pace(len(chunk), self.bandwidth, up=False)
                h.wfile.write(chunk)
                with self._lock:
                    self.served[key] += len(chunk)
            if cut is not None:  # the rest never comes: the client sees the connection close
                h.wfile.flush()
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client went away (a killed job)
            h.close_connection = True
        finally:
            with self._lock:
                self.active -= 1


# -- the emulators ---------------------------------------------------------------------------

def _gcs_object(method: str, path: str, query: str) -> str | None:
    """bucket/key of a GCS JSON API media download (`alt=media`), else None."""
    m = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path)
    if method != "GET" or m is None or "alt=media" not in query:
        return None
    return f"{m.group(1)}/{urllib.parse.unquote(m.group(2))}"


def _azure_object(method: str, path: str, query: str) -> str | None:
    """container/blob of an Azure Blob read (GET without a `comp=` or `restype=`), else None."""
    parts = urllib.parse.unquote(path).lstrip("/").split("/", 2)
    if method != "GET" or len(parts) < 3 or "comp=" in query or "restype=" in query:
        return None
    return f"{parts[1]}/{parts[2]}"


class _Process:
    """An emulator process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_for(self, ready: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            got = ready()
            if got:
                return got
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} did not start:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class GcsEmulator(MeteredProxy):
    """`gcp-storage-emulator start` (in memory) behind the metering proxy. Its server handles
    one request at a time (http.server's HTTPServer), so the proxy sends it one at a time."""

    DENIED = ({"Content-Type": "application/json"}, json.dumps({"error": {
        "code": 403, "message": "bertscale-ci@example.iam.gserviceaccount.com does not have "
        "storage.objects.create access to the Google Cloud Storage object. Permission "
        "'storage.objects.create' denied on resource (or it may not exist).",
        "errors": [{"reason": "forbidden", "domain": "global"}]}}).encode())

    def __init__(self, workdir: Path):
        for attempt in range(3):  # the port is picked free, then bound by another process
            port = _free_port()
            self.process = _Process([sys.executable, "-m", "gcp_storage_emulator", "start",
                                     "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                                     "-q"], workdir / f"gcs-{attempt}.log")

            def ready(port: int = port) -> bool:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    conn.request("GET", "/")
                    return conn.getresponse().read() == b"OK"  # its health check, no other's
                except OSError:
                    return False
                finally:
                    conn.close()
            try:
                self.process.wait_for(ready, "gcp-storage-emulator", timeout=30)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        super().__init__(port, _gcs_object, upstream_slots=1)

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def stop(self) -> None:
        super().stop()
        self.process.stop()


class AzuriteBlob(MeteredProxy):
    """Azurite's blob service (data in a folder of its own, telemetry off) behind the metering
    proxy, reached with the development account's connection string."""

    def __init__(self, workdir: Path):
        binary = install_azurite()
        data = workdir / "azurite"
        data.mkdir(parents=True, exist_ok=True)
        log = workdir / "azurite.log"
        self.process = _Process([str(binary), "--blobHost", "127.0.0.1", "--blobPort", "0",
                                 "--location", str(data), "--disableTelemetry",
                                 "--skipApiVersionCheck", "--silent"], log)

        def ready() -> int | None:
            m = re.search(rb"successfully listens on http://127\.0\.0\.1:(\d+)", log.read_bytes())
            return int(m.group(1)) if m else None
        port = self.process.wait_for(ready, "Azurite", timeout=60)
        super().__init__(port, _azure_object)

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};")}

    def stop(self) -> None:
        super().stop()
        self.process.stop()


def _local_s3(workdir: Path) -> Any:
    from bertscale.bench.s3_server import LocalS3
    return LocalS3()


_STARTERS: dict[str, Callable[[Path], Any]] = {"s3": _local_s3, "gs": GcsEmulator,
                                                "az": AzuriteBlob}
_FS_CLASSES = {"s3": ("s3fs", "S3FileSystem"), "gs": ("gcsfs.core", "GCSFileSystem"),
               "az": ("adlfs", "AzureBlobFileSystem")}


def clear_clients(kind: str) -> None:
    """Forget fsspec's cached client of one store kind (it keeps the endpoint it was made with)."""
    import importlib
    module, name = _FS_CLASSES[kind]
    with contextlib.suppress(ImportError):
        cls = getattr(importlib.import_module(module), name)
        cls.clear_instance_cache()
        if kind == "gs":  # gcsfs registers its extended class under gs:// by default
            import gcsfs
            gcsfs.GCSFileSystem.clear_instance_cache()


# -- what a test holds -----------------------------------------------------------------------

_BUCKETS = itertools.count()


@dataclass
class Store:
    """One bucket of one store kind: `url()` for bertscale; `env`, the variables that point
    bertscale at the store (the `store` fixture puts them in this process's environment, which
    the processes a test starts inherit; pass them on explicitly to a clean environment);
    `server` for the metering (gets, served, cut_next, bandwidth, put_bandwidth, reset_counts,
    wait_idle)."""

    kind: str
    bucket: str
    server: Any
    env: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{self.kind}://{self.bucket}"

    def url(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    @staticmethod
    def key(url: str) -> str:
        """bucket/key of a URL: what the server's counters are indexed by."""
        return url.split("://", 1)[1]

    def fs(self) -> Any:
        """The store's fsspec filesystem, as bertscale makes it (for setting up and looking)."""
        from bertscale.data import remote
        return remote.filesystem(self.prefix)


class Servers:
    """The session's servers, each started on first use and stopped at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: dict[str, Any] = {}

    def server(self, kind: str) -> Any:
        if kind not in self.running:
            self.running[kind] = _STARTERS[kind](self.workdir)
        return self.running[kind]

    def new_bucket(self, kind: str) -> Store:
        """A store of `kind` with a new, empty bucket (container), made with the environment
        applied to this process (the caller's job: the fixture does it)."""
        server = self.server(kind)
        store = Store(kind, f"bertscale-{next(_BUCKETS)}-{os.getpid()}", server, server.env())
        store.fs().mkdir(store.bucket)
        return store

    def stop(self) -> None:
        for server in self.running.values():
            with contextlib.suppress(Exception):
                server.stop()
        self.running.clear()


if __name__ == "__main__":
    if sys.argv[1:] != ["--install-azurite"]:
        sys.exit("usage: python tests/stores.py --install-azurite")
    try:
        print(f"Azurite {AZURITE_VERSION}: {install_azurite()}")
    except RuntimeError as e:
        sys.exit(f"stores.py: {e}")
