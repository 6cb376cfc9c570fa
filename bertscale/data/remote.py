"""Object stores and other remote locations of shards and manifests, behind one small interface.

Locations: ``s3://bucket/key`` (s3fs), ``gs://`` / ``gcs://`` (gcsfs), ``az://`` / ``abfs://``
(adlfs), ``http(s)://`` (fsspec's HTTP filesystem, aiohttp) and ``pipe:COMMAND`` (the command's
stdout, WebDataset's convention). Everything but ``pipe:`` goes through fsspec, so one code path
serves every store, and each store's package is an optional extra (``pip install
'bertscale[s3]'``, ``[gcs]``, ``[azure]``, ``[http]``) that is imported only when a location of
that kind is used.

Credentials and endpoints come from the environment and each store's usual configuration, never
from a manifest: for S3, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``,
``~/.aws``, instance roles, and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an
S3-compatible store (MinIO, Ceph, …); for GCS, application-default credentials
(``GOOGLE_APPLICATION_CREDENTIALS``); for Azure, ``AZURE_STORAGE_ACCOUNT_NAME`` and
``AZURE_STORAGE_KEY`` / ``AZURE_STORAGE_CONNECTION_STRING`` or a managed identity.

Limits: reads are whole-object streams (a shard is fetched whole into the node cache, see
`bertscale.data.cache`); ``pipe:`` cannot be listed or uploaded to, and its failures are not
classified (every one counts as transient and is retried).
"""

from __future__ import annotations

import hashlib
import importlib
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
    # fsspec caches one instance per (protocol, options): the ranks' threads share its pool.
    return fsspec.filesystem(kind)


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


def is_permanent(exc: BaseException) -> bool:
    """Errors that a retry cannot fix: a missing object, refused credentials."""
    return isinstance(exc, (FileNotFoundError, PermissionError, UserError))


def reason(exc: BaseException) -> str:
    """One line for an error from any store client (their messages can span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"no such object ({text})"
    if isinstance(exc, PermissionError):
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
