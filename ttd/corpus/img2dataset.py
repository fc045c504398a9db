"""Readers of img2dataset's three output layouts: webdataset tars, parquet with image bytes, and files folders.

We stream tars with the standard library's `tarfile` rather than the webdataset package: we need every member
accounted for against the sibling metadata (missing keys, extra keys, a truncated tail) and partial shards
salvaged, which webdataset's pipeline abstracts away behind its error handlers.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from ttd.corpus import tarscan
from ttd.corpus.base import (
    Caption,
    Corpus,
    ReadIssue,
    Sample,
    ShardRef,
    ShardStats,
    decode_caption,
    files_fingerprint,
    json_meta,
    read_metadata,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # in order of preference when a sample has two
CAPTION_META_COLUMNS = ["key", "status", "caption"]  # all a caption-only pass needs from the metadata
_SHARD_RE = re.compile(r"^(\d+)\.(tar|parquet)$")


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000010002.jpg' -> ('000010002', 'jpg'); webdataset keys end at the first dot of the basename."""
    base = posixpath.basename(name)
    key, _, ext = base.partition(".")
    return key, ext.lower()


_MEMBER_NAME = re.compile(r"^(?:[^\n]*/)?([^/.\n]*)(?:\.([^/\n]*))?$", re.M)


class _Groups(NamedTuple):
    """A pristine tar's members grouped by sample (consecutive members with one key)."""

    keys: list[str]
    has_image: list[bool]
    texts: list[bytes | None]  # the group's `.txt` bytes
    bounds: list[int]  # group i holds members bounds[i]:bounds[i + 1]
    exts: list[str]  # lower-case extension per member

    def exts_of(self, i: int) -> list[str]:
        return self.exts[self.bounds[i]:self.bounds[i + 1]]


def _group_members(members: list[tuple[str, bytes | None]]) -> _Groups | None:
    """Keys and extensions of every member with one regular expression, groups found with array operations;
    None for names this cannot split (a line break inside a name)."""
    names = "\n".join(name for name, _ in members)
    parts = _MEMBER_NAME.findall(names)
    if len(parts) != len(members):
        return None
    keys = np.array([k for k, _ in parts], dtype=object)
    exts = "\n".join(e for _, e in parts).lower().split("\n") if parts else []
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if parts else np.zeros(0, np.int64)
    is_image = np.isin(np.array(exts, dtype=object), list(IMAGE_EXTS))
    has_image = np.logical_or.reduceat(is_image, starts).tolist() if parts else []
    texts: list[bytes | None] = [None] * len(starts)
    txt = [i for i, e in enumerate(exts) if e == "txt"]
    if txt:
        group = np.searchsorted(starts, txt, side="right") - 1
        for g, i in zip(group.tolist(), txt):  # the last `.txt` of a group wins, as in a dict
            texts[g] = members[i][1]
    return _Groups(keys[starts].tolist(), has_image, texts, [*starts.tolist(), len(members)], exts)


class _Img2datasetCorpus(Corpus):
    data_ext = ""  # the file that defines a shard: tar or parquet

    def _listing(self) -> dict[str, dict]:
        """Every entry of the corpus folder by path, with its details, from one listing: a shard's files are then
        looked up in constant time (fsspec answers `exists`/`info` from its listing cache by a scan of the whole
        folder, quadratic over a corpus of 10,000 shards)."""
        return {e["name"].rstrip("/"): e for e in self.loc.fs.ls(self.loc.path, detail=True)}

    def _shard_names(self, listing: dict[str, dict] | None = None) -> list[str]:
        names = set()
        for p in listing if listing is not None else self._listing():
            m = _SHARD_RE.match(posixpath.basename(p))
            if m and m.group(2) == self.data_ext:
                names.add(m.group(1))
        return sorted(names)

    def _ref(self, name: str, extra: list[str], listing: dict[str, dict]) -> ShardRef:
        stats = self.loc.join(f"{name}_stats.json")
        paths = [*extra, self.loc.join(f"{name}.parquet"), stats]
        return ShardRef(self.name, name, tuple(paths), stats in listing, files_fingerprint(self.loc, paths, listing),
                        tuple(listing.get(p, {}).get("size") for p in paths),
                        tuple(listing.get(p, {}).get("ETag") for p in paths))

    def shards(self) -> list[ShardRef]:
        listing = self._listing()
        return [self._ref(n, self._shard_files(n), listing) for n in self._shard_names(listing)]

    def _shard_files(self, name: str) -> list[str]:
        """The shard's data files besides its metadata parquet and _stats.json."""
        return [self.loc.join(f"{name}.{self.data_ext}")]

    def metadata_files(self) -> list[str]:
        listing = self._listing()
        return [self.loc.uri(self.loc.join(f"{n}.parquet")) for n in self._shard_names(listing)
                if self.loc.join(f"{n}.parquet") in listing]

    def _load_meta(self, shard: ShardRef, stats: ShardStats | None,
                   columns: list[str] | None = None) -> tuple[dict[str, dict], list[ReadIssue]]:
        """key -> metadata row of successful rows; non-success rows are counted as skipped."""
        issues = []
        path = self.loc.join(f"{shard.name}.parquet")
        table = read_metadata(self.loc, path, columns, shard)
        if table is None:
            issues.append(self._issue(shard, None, "missing_metadata",
                                      f"no {shard.name}.parquet beside the shard: keys cannot be checked",
                                      stats, "warning", self.loc.uri()))
            return {}, issues
        ok = {}
        for row in table.to_pylist():
            status = row.get("status") or "success"
            if status != "success":
                if stats is not None:
                    stats.skipped_status[status] += 1
                continue
            ok[str(row["key"])] = row
        return ok, issues

    def _finish(self, shard: ShardRef, meta: dict[str, dict], seen: set[str], stats: ShardStats | None,
                source: str) -> Iterator[ReadIssue]:
        for key in sorted(set(meta) - seen):
            yield self._issue(shard, key, "missing_in_shard",
                              "metadata lists the key as success but the shard holds no image for it", stats,
                              source=source)

    def _sample(self, shard: ShardRef, key: str, files: dict[str, bytes | None], meta: dict[str, dict],
                stats: ShardStats | None, source: str, captions_only: bool = False
                ) -> Iterator[Sample | Caption | ReadIssue]:
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            yield self._issue(shard, key, "missing_image", f"no image member among {sorted(files)}", stats,
                              source=source)
            return
        if meta and key not in meta:
            yield self._issue(shard, key, "missing_in_metadata",
                              "key is in the shard but not among the metadata's successful rows; sample kept",
                              stats, "warning", source)
        caption, warning = decode_caption(files.get("txt"))
        if caption is None:
            caption = (meta.get(key) or {}).get("caption")
        if warning:
            yield self._issue(shard, key, "invalid_utf8", warning + "; undecodable bytes replaced", stats,
                              "warning", source)
        if stats is not None:
            stats.samples += 1
        if captions_only:
            yield Caption(key, caption, source)
            return
        info = dict(meta.get(key) or json_meta(files.get("json")))
        yield Sample(self.name, shard.name, key, caption, files[image_ext], info, source, self.max_pixels)


class WebDatasetCorpus(_Img2datasetCorpus):
    format = "webdataset"
    data_ext = "tar"

    def read_shard(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Sample | ReadIssue]:
        meta, issues = self._load_meta(shard, stats)
        yield from issues
        source = self.loc.uri(shard.paths[0])
        seen: set[str] = set()
        group_key, group = None, {}
        try:
            with shard.open(self.loc, shard.paths[0]) as f, \
                    tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member(member.name)
                    data = tar.extractfile(member).read()  # first: a member cut off mid-data joins no group
                    if key != group_key and group_key is not None:
                        seen.add(group_key)
                        yield from self._sample(shard, group_key, group, meta, stats, source)
                        group = {}
                    group_key = key
                    group[ext] = data
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield self._issue(shard, None, "truncated_shard",
                              f"tar ends early or is corrupt ({type(exc).__name__}: {exc}); samples before it kept",
                              stats, source=source)
        if group_key is not None:  # the last group: complete members were read before any failure
            seen.add(group_key)
            yield from self._sample(shard, group_key, group, meta, stats, source)
        yield from self._finish(shard, meta, seen, stats, source)

    def read_captions(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Caption | ReadIssue]:
        """The tar scanned by `tarscan`: image and json members are read past, never kept or parsed."""
        try:
            members, error = self._scan_captions(shard)
        except tarscan.Unsupported as exc:
            log.debug("shard %s: %s; reading captions with tarfile", shard.name, exc)
            yield from super().read_captions(shard, stats)
            return
        meta, issues = self._load_meta(shard, stats, CAPTION_META_COLUMNS)
        yield from issues
        source = self.loc.uri(shard.paths[0])
        seen: set[str] = set()
        if isinstance(members, _Groups):  # a pristine tar, grouped in bulk: the usual case
            yield from self._plain_captions(shard, members, meta, stats, source, seen)
            yield from self._finish(shard, meta, seen, stats, source)
            return
        group_key, group = None, {}
        for key, ext, data in members:
            if key != group_key and group_key is not None:
                seen.add(group_key)
                yield from self._sample(shard, group_key, group, meta, stats, source, captions_only=True)
                group = {}
            group_key = key
            group[ext] = data
        if error is not None:
            yield self._issue(shard, None, "truncated_shard",
                              f"tar ends early or is corrupt ({type(error).__name__}: {error}); samples before it "
                              "kept", stats, source=source)
        if group_key is not None:
            seen.add(group_key)
            yield from self._sample(shard, group_key, group, meta, stats, source, captions_only=True)
        yield from self._finish(shard, meta, seen, stats, source)

    def _plain_captions(self, shard: ShardRef, groups: _Groups, meta: dict[str, dict], stats: ShardStats | None,
                        source: str, seen: set[str]) -> Iterator[Caption | ReadIssue]:
        """`_sample(captions_only=True)` per group, without its generator and dict where nothing is unusual."""
        for i, (key, image, data) in enumerate(zip(groups.keys, groups.has_image, groups.texts)):
            seen.add(key)
            if data is not None and image and (not meta or key in meta):
                try:
                    caption = data.decode("utf-8")
                except UnicodeDecodeError:
                    pass
                else:
                    if stats is not None:
                        stats.samples += 1
                    yield Caption(key, caption, source)
                    continue
            files = dict.fromkeys(groups.exts_of(i))  # only the caption's bytes matter here
            if data is not None:
                files["txt"] = data
            yield from self._sample(shard, key, files, meta, stats, source, captions_only=True)

    def _scan_captions(self, shard: ShardRef) -> tuple[list[tuple[str, str, bytes | None]] | _Groups, Exception | None]:
        """(key, ext, txt bytes or None) per member, and the error that ended the scan early, if any. A pristine
        tar takes `fast_scan` and comes grouped by sample (`_group_members`); any other is read again by the exact
        `scan`. Collected before anything is yielded, so that an `Unsupported` tar can still be re-read from the
        start with tarfile."""
        members: list[tuple[str, str, bytes | None]] = []
        try:
            with shard.open(self.loc, shard.paths[0]) as f:
                fast = tarscan.fast_scan(f)
            groups = _group_members(fast) if fast is not None else None
            if groups is not None:
                return groups, None
        except (tarfile.TarError, EOFError, OSError):
            pass  # the exact scan below says what is wrong
        try:
            with shard.open(self.loc, shard.paths[0]) as f:
                for name, data in tarscan.scan(f):
                    key, _, ext = name.rpartition("/")[2].partition(".")  # as _split_member, inlined: hot loop
                    ext = ext.lower()
                    members.append((key, ext, data if ext == "txt" else None))
        except (tarfile.TarError, EOFError, OSError) as exc:
            return members, exc
        return members, None


class FilesCorpus(_Img2datasetCorpus):
    """img2dataset `files` output: `00000/KEY.jpg` beside `KEY.txt` and `KEY.json`."""

    format = "files"
    data_ext = "parquet"

    def _shard_names(self, listing: dict[str, dict] | None = None) -> list[str]:
        listing = self._listing() if listing is None else listing
        return sorted(posixpath.basename(p) for p, e in listing.items()
                      if e.get("type") == "directory" and posixpath.basename(p).isdigit())

    def _shard_files(self, name: str) -> list[str]:
        return [self.loc.join(name)]

    def read_shard(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Sample | ReadIssue]:
        meta, issues = self._load_meta(shard, stats)
        yield from issues
        by_key: dict[str, list[str]] = {}
        for p in sorted(self.loc.fs.ls(shard.paths[0], detail=False)):
            key, _ = _split_member(p)
            by_key.setdefault(key, []).append(p)
        seen = set()
        for key, paths in sorted(by_key.items()):
            seen.add(key)
            files = {}
            for p in paths:
                try:
                    files[_split_member(p)[1]] = self.loc.fs.cat_file(p)
                except OSError as exc:
                    yield self._issue(shard, key, "unreadable_file", f"{p}: {exc}", stats, source=p)
            yield from self._sample(shard, key, files, meta, stats, self.loc.uri(shard.paths[0]))
        yield from self._finish(shard, meta, seen, stats, self.loc.uri(shard.paths[0]))


class ParquetCorpus(_Img2datasetCorpus):
    """img2dataset `parquet` output: image bytes in a binary column named after the encode format."""

    format = "parquet"
    data_ext = "parquet"
    batch_rows = 256  # decoded lazily; only one row group batch of bytes in memory at a time

    def _shard_files(self, name: str) -> list[str]:
        return []  # the metadata parquet is the data

    def _open(self, shard: ShardRef, stats: ShardStats | None, source: str):
        """(file, ParquetFile, image column) of a shard, or the one error row for a shard that cannot be read."""
        f = None
        try:
            f = shard.open(self.loc, shard.paths[0])
            pf = pq.ParquetFile(f)
        except Exception as exc:  # unreadable footer: the whole shard is one error row
            if f is not None:
                f.close()
            return self._issue(shard, None, "unreadable_shard", f"{type(exc).__name__}: {exc}", stats, source=source)
        names = pf.schema_arrow.names
        image_col = next((e for e in IMAGE_EXTS if e in names), None)
        if image_col is None:
            f.close()
            return self._issue(shard, None, "missing_image", f"no image column among {names}", stats, source=source)
        return f, pf, image_col

    def _read(self, shard: ShardRef, stats: ShardStats | None, rows) -> Iterator:
        """`rows(pf, image_col, source)`'s items from the shard's open file; an unreadable file or a failure part
        way through becomes a ReadIssue after the items read so far."""
        source = self.loc.uri(shard.paths[0])
        opened = self._open(shard, stats, source)
        if isinstance(opened, ReadIssue):
            yield opened
            return
        f, pf, image_col = opened
        with f:
            try:
                yield from rows(pf, image_col, source)
            except Exception as exc:
                yield self._issue(shard, None, "truncated_shard", f"{type(exc).__name__}: {exc}", stats,
                                  source=source)

    @staticmethod
    def _kept(status: str | None, stats: ShardStats | None) -> bool:
        """img2dataset's rows that failed to download are counted by status and left out."""
        status = status or "success"
        if status != "success":
            if stats is not None:
                stats.skipped_status[status] += 1
            return False
        if stats is not None:
            stats.samples += 1
        return True

    def read_shard(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Sample | ReadIssue]:
        def rows(pf, image_col, source):
            for batch in pf.iter_batches(batch_size=self.batch_rows):
                for row in batch.to_pylist():
                    if self._kept(row.get("status"), stats):
                        data = row.pop(image_col)
                        yield Sample(self.name, shard.name, str(row.get("key")), row.get("caption"), data or b"",
                                     row, source, self.max_pixels)

        return self._read(shard, stats, rows)

    def read_captions(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Caption | ReadIssue]:
        """Only the key, status and caption columns are read: image bytes never leave the file."""
        def rows(pf, _image_col, source):
            columns = [c for c in CAPTION_META_COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                n = batch.num_rows
                keys, statuses, captions = (batch.column(c).to_pylist() if c in columns else [None] * n
                                            for c in ("key", "status", "caption"))
                for key, status, caption in zip(keys, statuses, captions):
                    if self._kept(status, stats):
                        yield Caption(str(key), caption, source)

        return self._read(shard, stats, rows)
