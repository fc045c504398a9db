"""What every corpus reader yields: samples with lazily decoded images, and issues that become `errors` rows."""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ttd.errors import ImageDecodeError
from ttd.store.store import fingerprint
from ttd.store.uri import Location

log = logging.getLogger(__name__)

# Refuse images above this many pixels before decoding them (a decompression bomb declares a huge size in a tiny
# file). 8K x 8K covers every real web image; the limit is a reader option.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class Sample:
    """One image-text pair. The image stays encoded until `image()` is called."""

    corpus: str
    shard: str
    key: str
    caption: str | None
    image_bytes: bytes
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS

    def image(self) -> Image.Image:
        """Decode to RGB, or raise ImageDecodeError with a stable `error_type`."""
        return decode_image(self.image_bytes, self.max_pixels)


class Caption(NamedTuple):
    """One sample's caption without its image: what stages that never look at pixels read (`read_captions`).
    A tuple, not a dataclass: tens of thousands are made per shard."""

    key: str
    caption: str | None
    source: str = ""


@dataclass
class ReadIssue:
    """A problem found while reading a shard; stages write it to the `errors` table with stage='read'."""

    corpus: str
    shard: str
    key: str | None
    error_type: str
    message: str
    severity: str = "error"  # "warning": the sample was still yielded
    source: str = ""

    def as_row(self, stage: str = "read") -> dict[str, Any]:
        return {
            "key": self.key,
            "stage": stage,
            "error_type": self.error_type,
            "message": self.message,
            "severity": self.severity,
            "source": self.source,
        }


@dataclass
class ShardStats:
    """Counts of one pass over a shard."""

    samples: int = 0
    skipped_status: Counter = field(default_factory=Counter)  # img2dataset status -> rows skipped
    errors: int = 0
    warnings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "skipped_status": dict(sorted(self.skipped_status.items())),
            "errors": self.errors,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class ShardRef:
    """A unit of work: one shard of one corpus, with the fingerprint of its input files."""

    corpus: str
    name: str
    paths: tuple[str, ...]  # the shard's files (or folder) in the corpus filesystem
    complete: bool  # img2dataset wrote its _stats.json (or the format has no such marker)
    fingerprint: str
    sizes: tuple[int | None, ...] = ()  # of `paths`, from the corpus listing (empty: not known)
    etags: tuple[str | None, ...] = ()  # of `paths` on an object store, from the same listing

    def listed(self, path: str) -> tuple[int | None, str | None]:
        """The file's size and ETag as the corpus listing saw them (None: not known)."""
        i = self.paths.index(path)
        return (self.sizes[i] if i < len(self.sizes) else None, self.etags[i] if i < len(self.etags) else None)

    def open(self, loc: Location, path: str):
        """One of the shard's files, opened for reading without asking the store its size again."""
        return loc.open_read(path, *self.listed(path))

    @property
    def partition(self) -> dict[str, str]:
        return {"corpus": self.corpus, "shard": self.name}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty_image", "image has zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", f"bytes are not a known image format (starts {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("decompression_bomb", str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:  # a recognised header over broken data
        raise ImageDecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError("decompression_bomb", f"image declares {w}x{h} pixels, over the limit {max_pixels}")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise ImageDecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def decode_caption(data: bytes | None) -> tuple[str | None, str | None]:
    """UTF-8 caption, and a warning message if bytes had to be replaced."""
    if data is None:
        return None, None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return data.decode("utf-8", errors="replace"), f"caption is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def files_fingerprint(loc: Location, paths: list[str], listing: dict[str, dict] | None = None) -> str:
    """Changes when any input file changes: size plus ETag (object stores) or modification time. `listing`: the
    details of a folder listing that holds the paths (no request per file)."""
    parts = []
    for p in paths:
        try:
            info = loc.fs.info(p) if listing is None else listing[p]
        except (FileNotFoundError, KeyError):
            parts.append((posixpath.basename(p), None))
            continue
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        parts.append((posixpath.basename(p), info.get("size"), str(stamp)))
    return fingerprint(parts)


def read_metadata(loc: Location, path: str, columns: list[str] | None = None,
                  shard: ShardRef | None = None) -> pa.Table | None:
    """An img2dataset sibling parquet without its image column; None when it is absent. `shard`: the shard the
    file belongs to, whose listing gives its size."""
    try:
        with (shard.open(loc, path) if shard is not None else loc.fs.open(path, "rb")) as f:
            pf = pq.ParquetFile(f)
            names = [n for n in pf.schema_arrow.names if pf.schema_arrow.field(n).type != pa.binary()]
            return pf.read(columns=[c for c in (columns or names) if c in names])
    except FileNotFoundError:
        return None


def json_meta(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


class Corpus:
    """Base of every reader: a named, sharded, streaming source of samples."""

    format: str = ""

    def __init__(self, loc: Location, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.loc = loc
        self.name = name
        self.max_pixels = max_pixels

    @property
    def uri(self) -> str:
        return self.loc.uri()

    def shards(self) -> list[ShardRef]:
        raise NotImplementedError

    def read_shard(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Sample | ReadIssue]:
        """Yield the shard's samples in order, and a ReadIssue for each problem; fills `stats` as it goes."""
        raise NotImplementedError

    def read_captions(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Caption | ReadIssue]:
        """Like `read_shard`, the same samples and issues in the same order, but captions only. Readers override
        it where images can be skipped (tar members read past, parquet image columns never read)."""
        for item in self.read_shard(shard, stats):
            yield Caption(item.key, item.caption, item.source) if isinstance(item, Sample) else item

    def metadata_files(self) -> list[str]:
        """URIs of Parquet files with one row per input (img2dataset metadata), for the `samples` SQL view."""
        return []

    def metadata_table(self) -> pa.Table | None:
        """The metadata as one Arrow table, for corpora without metadata files (manifests)."""
        return None

    def iter_samples(self) -> Iterator[Sample | ReadIssue]:
        for shard in self.shards():
            yield from self.read_shard(shard)

    def _issue(self, shard: ShardRef, key: str | None, kind: str, msg: str, stats: ShardStats | None,
               severity: str = "error", source: str = "") -> ReadIssue:
        if stats is not None:
            if severity == "error":
                stats.errors += 1
            else:
                stats.warnings += 1
        return ReadIssue(self.name, shard.name, key, kind, msg, severity, source)
