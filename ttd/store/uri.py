"""One place that turns a user's URI (local path or any fsspec URL) into a filesystem and a path.

S3 credentials and endpoint come from the environment or the standard AWS configuration
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `~/.aws/...`): nothing here reads or stores secrets.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec

from ttd.errors import TTDError, exception_chain, storage_problem


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it, with the URI it came from."""

    fs: fsspec.AbstractFileSystem
    path: str  # no protocol, no trailing slash
    protocol: str  # "file", "s3", "memory", ...

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, path: str | None = None) -> str:
        """A URI for `path` (default: this location) that fsspec, pyarrow and DuckDB all accept."""
        path = self.path if path is None else path
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def child(self, *parts: str) -> Location:
        return Location(self.fs, self.join(*parts), self.protocol)

    def open_read(self, path: str, size: int | None = None, etag: str | None = None):
        """`path` opened for reading. On S3, `size` and `etag` from a listing spare s3fs the HEAD it would send
        to learn them (it reads with If-Match on the ETag: a file replaced since the listing fails to read)."""
        if size is None or not etag or self.protocol != "s3":
            return self.fs.open(path, "rb")
        f = self.fs.open(path, "rb", size=size)
        f.details = {"name": path, "size": size, "type": "file", "ETag": etag}
        return f


def _protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    proto = proto[0] if isinstance(proto, (tuple, list)) else proto
    return {"s3a": "s3", "local": "file"}.get(proto, proto)


def resolve(uri: str, *, must_exist: bool = False, what: str = "path") -> Location:
    """Parse `uri`; refuse `..` segments (a store or corpus URI never needs to climb out of itself)."""
    if not isinstance(uri, str) or not uri.strip():
        raise TTDError(f"empty {what} URI: give a local path or a URL such as s3://bucket/prefix")
    raw = uri.strip()
    body = raw.split("://", 1)[-1]
    if any(seg == ".." for seg in body.replace("\\", "/").split("/")):
        raise TTDError(f"{what} URI {raw!r} contains '..': give the resolved path instead")
    if "://" not in raw:
        raw = os.path.abspath(os.path.expanduser(raw))
    try:
        fs, path = fsspec.core.url_to_fs(raw)
    except (ImportError, ValueError) as exc:
        raise TTDError(f"cannot open {what} URI {uri!r}: {exc}") from None
    protocol = _protocol_of(fs)
    path = path.rstrip("/") or "/"
    loc = Location(fs, path, protocol)
    if must_exist:
        try:
            ok = fs.exists(path)
        except Exception as exc:  # network or permission trouble: still one clear line
            raise TTDError(f"cannot reach {what} {uri!r}: {type(exc).__name__}: {exc}") from None
        if not ok:
            raise TTDError(f"{what} {uri!r} does not exist: check the path or URL")
    return loc


_UNREACHABLE = ("NoCredentialsError", "PartialCredentialsError", "EndpointConnectionError", "ConnectTimeoutError")
_REACHED: set[str] = set()  # S3 locations this process has already reached: checked once, not per Store


def check_reachable(loc: Location, what: str = "path") -> None:
    """Fail in seconds, in one line, when an S3 store cannot be reached at all or has no credentials: one request
    without retries first, since botocore and s3fs retry such failures for tens of seconds before giving up.
    Anything else (a throttled or failed request) is left to the filesystem and its retries."""
    if loc.protocol != "s3" or loc.uri() in _REACHED:
        return
    import s3fs

    options = dict(loc.fs.storage_options)
    config = {**options.get("config_kwargs", {}), "connect_timeout": 5, "retries": {"max_attempts": 1}}
    quick = s3fs.S3FileSystem(**{**options, "config_kwargs": config, "skip_instance_cache": True})
    quick.retries = 1  # s3fs's own retry loop, around botocore's
    try:
        quick.exists(loc.path)
    except Exception as exc:
        if any(type(cause).__name__ in _UNREACHABLE for cause in exception_chain(exc)):
            raise TTDError(f"{what} {loc.uri()!r}: {storage_problem(exc)}") from None
        return  # something else: the real filesystem, with its retries, decides
    _REACHED.add(loc.uri())
