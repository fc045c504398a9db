"""The listing of an img2dataset folder: every entry whose name starts with a digit (shards `NNNNN.tar` or
`.parquet`, their `NNNNN.parquet` metadata and `NNNNN_stats.json`, `NNNNN/` folders), the only names the readers use.

On S3 one ListObjectsV2 stream would page through the folder 1,000 keys at a time, one request after the other:
30 pages for 10,000 shards, 700 for LAION's 230,000. Here a folder of more than one page is split by the digits
that start its names and the parts are listed at the same time: a part whose first page is full is split again by its next character,
so a prefix shared by every name (img2dataset pads shard numbers with zeros) costs a level, not a serial walk.
Soundness: a part `Q` that is split is covered by its ten digit children `Q0`..`Q9`, by the keys of its first page
that sort before `Q0` (a next character below '0': '.', '-'), and by one listing that starts after every `Q9...`
key (a next character above '9': '_', letters); keys found twice are kept once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ttd.store.uri import Location

DIGITS = "0123456789"
_AFTER_ALL = "\U0010ffff"  # the largest code point: Q + '9' + this sorts after every key that starts with Q + '9'
PAGE = 1000  # S3's most keys a page


def list_digit_led(loc: Location) -> list[dict[str, Any]]:
    """The folder's entries whose names start with a digit, in fsspec's `ls(detail=True)` form (name, size,
    type, and on S3 the ETag), sorted by name; empty when it holds none or does not exist."""
    if loc.protocol != "s3":
        try:
            entries = [e for e in loc.fs.ls(loc.path, detail=True) if _base(e["name"])[:1].isdigit()]
        except FileNotFoundError:
            return []
    else:
        from fsspec.asyn import sync

        bucket, key, _ = loc.fs.split_path(loc.path)
        entries = sync(loc.fs.loop, _list_parts, loc.fs, bucket, f"{key}/" if key else "")
    return sorted(entries, key=lambda e: e["name"])


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


async def _list_parts(fs, bucket: str, folder: str) -> list[dict[str, Any]]:
    first = await _page(fs, bucket, folder)
    if not first.get("IsTruncated"):  # a folder of one page: one request, as one stream would make
        return [e for k, e in _entries(bucket, first) if k[len(folder):][:1].isdigit()]
    parts = await asyncio.gather(*(_list_part(fs, bucket, folder + d) for d in DIGITS))
    found: dict[str, dict[str, Any]] = {}
    for part in parts:
        for entry in part:
            found[entry["name"]] = entry
    return list(found.values())


async def _page(fs, bucket: str, prefix: str, *, start_after: str | None = None,
                token: str | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": PAGE}
    if token:
        kw["ContinuationToken"] = token
    elif start_after:
        kw["StartAfter"] = start_after
    return await fs._call_s3("list_objects_v2", **kw)


def _entries(bucket: str, page: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, fsspec entry) of a page's objects and folders, as s3fs's `ls` gives them."""
    out = [(c["Key"], {**c, "name": f"{bucket}/{c['Key']}", "type": "file", "size": c["Size"]})
           for c in page.get("Contents", [])]
    for p in page.get("CommonPrefixes", []):
        name = f"{bucket}/{p['Prefix'].rstrip('/')}"
        out.append((p["Prefix"], {"Key": name, "Size": 0, "StorageClass": "DIRECTORY", "type": "directory",
                                  "size": 0, "name": name}))
    return out


async def _rest(fs, bucket: str, prefix: str, page: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A page and every page after it, one after the other."""
    out = _entries(bucket, page)
    while page.get("IsTruncated"):
        page = await _page(fs, bucket, prefix, token=page["NextContinuationToken"])
        out += _entries(bucket, page)
    return out


async def _list_part(fs, bucket: str, prefix: str) -> list[dict[str, Any]]:
    first = await _page(fs, bucket, prefix)
    found = _entries(bucket, first)
    if not first.get("IsTruncated"):
        return [e for _, e in found]
    if max(k for k, _ in found) < prefix + "0":  # a full page of keys below the digits (rare): walk the part
        return [e for _, e in await _rest(fs, bucket, prefix, first)]
    below = [e for k, e in found if k < prefix + "0"]
    after = _page(fs, bucket, prefix, start_after=prefix + "9" + _AFTER_ALL)
    parts = await asyncio.gather(*(_list_part(fs, bucket, prefix + d) for d in DIGITS), after)
    out = below + [e for part in parts[:-1] for e in part]
    out += [e for _, e in await _rest(fs, bucket, prefix, parts[-1])]
    return out
