"""Object stores and other remote locations of shards and manifests, behind one small interface.

Locations: ``s3://bucket/key`` (s3fs), ``gs://`` / ``gcs://`` (gcsfs), ``az://`` / ``abfs://``
(adlfs), ``http(s)://`` (fsspec's HTTP filesystem, aiohttp) and ``pipe:COMMAND`` (the command's
stdout, WebDataset's convention). Everything but ``pipe:`` goes through fsspec, so one code path
serves every store, and each store's package is an optional extra (``pip install
'bertscale[s3]'``, ``[gcs]``, ``[azure]``, ``[http]``) that is imported only when a location of
that kind is used.

Credentials and endpoints come from the environment and each store's usual configuration, never
from a manifest (docs/data.md has the table): for S3, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``~/.aws``, instance roles, and ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible store (MinIO, Ceph, …); for GCS,
application-default credentials (``GOOGLE_APPLICATION_CREDENTIALS``), and
``STORAGE_EMULATOR_HOST`` for an emulator; for Azure, ``AZURE_STORAGE_CONNECTION_STRING`` (its
``BlobEndpoint`` for Azurite), or ``AZURE_STORAGE_ACCOUNT_NAME`` with
``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN`` or a managed identity.

Limits: reads are whole-object streams (a shard is fetched whole into the node cache, see
`bertscale.data.cache`); ``pipe:`` cannot be listed or uploaded to, and its failures are not
classified (every one counts as transient and is retried).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
from pathlib import Path
from typing import IO, Any

from bertscale.errors import UserError

# scheme -> (module fsspec needs for it, the bertscale extra that installs it)
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
             "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"),
             "abfss": ("adlfs", "azure"), "http": ("aiohttp", "http"),
             "https": ("aiohttp", "http")}
READ_BLOCK = 8 << 20  # bytes per ranged GET when streaming an object


def is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "pipe" if url.startswith("pipe:") else ""


def join(base: str, name: str) -> str:
    """`name` inside the folder URL `base`."""
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def filesystem(url: str) -> Any:
    """The fsspec filesystem for `url`; a missing optional package is a one-line error that says
    which extra to install."""
    kind = scheme(url)
    if kind not in _BACKENDS:
        raise UserError(f"{url}: unsupported location (use a local path, s3://, gs://, az://, "
                        f"http(s):// or pipe:COMMAND)")
    module, extra = _BACKENDS[kind]
    try:
        import fsspec
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"{url}: reading {kind}:// locations needs the {module} package: "
                        f"pip install 'bertscale[{extra}]'") from None
    if module == "gcsfs" and os.environ.get("STORAGE_EMULATOR_HOST"):
        return _gcs_emulator_filesystem()
    # fsspec caches one instance per (protocol, options): the ranks' threads share its pool.
    return fsspec.filesystem(kind)


def _gcs_emulator_filesystem() -> Any:
    """gcsfs for a GCS emulator (``STORAGE_EMULATOR_HOST``, which gcsfs sends its requests to).
    As Google's own client libraries do for an emulator, requests go without credentials unless
    fsspec's configuration names a token (``FSSPEC_GS_TOKEN``): gcsfs's default search for
    credentials would otherwise ask the GCE metadata server, off this host. And gcsfs's default
    class (its experimental zonal / hierarchical-namespace support) first asks the Storage
    Control gRPC API for each bucket's layout, which no emulator serves: every call then waited
    60 s for that probe to time out (measured with gcp-storage-emulator). The JSON-API class is
    what an emulator speaks."""
    import fsspec
    from gcsfs.core import GCSFileSystem

    configured = any("token" in fsspec.config.conf.get(p, {}) for p in ("gs", "gcs"))
    return GCSFileSystem(**({} if configured else {"token": "anon"}))


def require_bucket(url: str, what: str) -> None:
    """A one-line UserError now when the bucket (container) of the store URL `url` does not
    exist, rather than after the work meant for it. bertscale creates no buckets: their region,
    access and billing are the owner's choices. Anything else the check meets lets it pass
    (credentials may be allowed to write objects but not to read the bucket's metadata, e.g.
    GCS's objectAdmin role): the upload itself then says what is wrong."""
    name = url.split("://", 1)[1].split("/", 1)[0]
    fs = filesystem(url)  # a missing store package is its own one line
    try:
        fs.info(f"{scheme(url)}://{name}")
    except FileNotFoundError:
        raise UserError(f"{what} {url}: there is no bucket {name} (create it first)") from None
    except Exception:  # noqa: BLE001 - see the docstring
        pass


class _PipeReader:
    """A `pipe:` command's stdout as a file; a non-zero exit is an error on close."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        return self.proc.stdout.read(n)

    def __enter__(self) -> "_PipeReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._finish(check=exc[0] is None)

    def close(self) -> None:
        """Stop reading; the command's non-zero exit is then an error."""
        self._finish(check=True)

    def _finish(self, check: bool) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        rc = self.proc.wait()
        if rc and check:
            raise OSError(f"command exited with status {rc}")


def open_read(location: str) -> IO[bytes] | _PipeReader:
    """A sequential reader of the whole object (use as a context manager)."""
    if location.startswith("pipe:"):
        return _PipeReader(location[len("pipe:"):])
    return filesystem(location).open(location, "rb", block_size=READ_BLOCK)


def read_bytes(location: str) -> bytes:
    """A small object (a manifest, a vocabulary) whole."""
    with open_read(location) as f:
        return f.read()


def object_size(url: str) -> int:
    return int(filesystem(url).info(url)["size"])


def read_range(url: str, start: int, end: int) -> bytes:
    return filesystem(url).cat_file(url, start=start, end=end)


def upload(local: Path, url: str) -> None:
    """Put one file; object stores make the object visible only once it is complete."""
    filesystem(url).put_file(str(local), url)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a store client's error carries, where it keeps one: azure-core's
    ``status_code``, gcsfs's ``code``, aiohttp's ``status``, botocore's response metadata.
    gcsfs turns a 403 into a plain OSError("Forbidden: ...")."""
    for attr in ("status_code", "code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    if type(exc) is OSError and str(exc).startswith("Forbidden:"):
        return 403
    return None


def is_permanent(exc: BaseException) -> bool:
    """Errors that a retry cannot fix: a missing object, refused credentials, a request the
    store rejects (4xx but a timeout or throttling). Connections cut, timeouts and 5xx are
    transient."""
    if isinstance(exc, (FileNotFoundError, PermissionError, UserError)):
        return True
    status = http_status(exc)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def reason(exc: BaseException) -> str:
    """One line for an error from any store client (their messages can span lines). Azure's
    carry a request id, a time and the XML body after the first line: that line and the error
    code stand for them."""
    text = str(exc).strip()
    code = getattr(exc, "error_code", None)  # azure-core: AuthenticationFailed, BlobNotFound, ...
    code = getattr(code, "value", code)  # azure.storage.blob StorageErrorCode (an enum)
    if code:
        text = text.splitlines()[0] if text else ""
    text = " ".join(text.split()) or type(exc).__name__
    if code and str(code) not in text:
        text += f" [{code}]"
    if len(text) > 400:
        text = text[:400] + "…"
    if isinstance(exc, FileNotFoundError) or http_status(exc) == 404:
        return f"no such object ({text})"
    if isinstance(exc, PermissionError) or http_status(exc) in (401, 403):
        return f"access denied, check the credentials in the environment ({text})"
    return f"{type(exc).__name__}: {text}"


def fetch_manifest(url: str, cache_root: Path) -> Path:
    """Copy a manifest in a store and the vocabulary it names into the node cache; returns the
    local manifest. Its shards stay in the store (their folder is the default shard base)."""
    import json

    from bertscale.files import write_bytes_atomic

    folder = cache_root / "manifests" / hashlib.sha256(url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        raw = read_bytes(url)
        vocab_name = json.loads(raw).get("vocab_file", "vocab.txt")
        vocab = read_bytes(join(parent(url), vocab_name))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any store client error becomes one line
        raise UserError(f"{url}: cannot read the data manifest: {reason(e)}") from None
    for name, data in (("manifest.json", raw), (vocab_name, vocab)):
        write_bytes_atomic(folder / name, data)
    return folder / "manifest.json"
