"""A plain manifest corpus: a JSONL or CSV file listing image paths (or URIs) and captions.

Columns: an image column (`image`, `image_path`, `path`, `file` or `url`), a caption column (`caption` or
`text`), and optionally `key`. Relative image paths resolve against the manifest's folder. Rows are cut into
shards of `shard_size` so manifests parallelise and resume like img2dataset corpora; keys default to
img2dataset's shape (5 digits of shard, 4 of row).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from ttd.corpus.base import Corpus, ReadIssue, Sample, ShardRef, ShardStats, files_fingerprint
from ttd.errors import TTDError
from ttd.store.store import fingerprint
from ttd.store.uri import resolve

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "url")
CAPTION_COLUMNS = ("caption", "text")


class ManifestCorpus(Corpus):
    format = "manifest"

    def __init__(self, loc, name, *, shard_size: int = 10_000, **kw):
        super().__init__(loc, name, **kw)
        if shard_size > 10_000:
            raise TTDError("manifest shard_size must be at most 10000 (keys hold 4 digits of row)")
        self.shard_size = shard_size
        self._table: pa.Table | None = None

    def _load(self) -> pa.Table:
        if self._table is None:
            try:
                with self.loc.fs.open(self.loc.path, "rb") as f:
                    if self.loc.path.endswith(".csv"):
                        table = pacsv.read_csv(f)
                    else:
                        table = pajson.read_json(f)
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise TTDError(f"manifest {self.uri!r} cannot be parsed: {exc}") from None
            names = table.column_names
            self.image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
            self.caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
            if self.image_col is None or self.caption_col is None:
                raise TTDError(f"manifest {self.uri!r} needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a "
                               f"caption column ({'/'.join(CAPTION_COLUMNS)}); it has {names}")
            if "key" not in names:
                keys = [f"{i // self.shard_size:05d}{i % self.shard_size:04d}" for i in range(table.num_rows)]
                table = table.append_column("key", pa.array(keys))
            else:
                table = table.set_column(names.index("key"), "key", table.column("key").cast(pa.string()))
            self._table = table
        return self._table

    def shards(self) -> list[ShardRef]:
        n = self._load().num_rows
        base = files_fingerprint(self.loc, [self.loc.path])
        return [ShardRef(self.name, f"{i:05d}", (self.loc.path,), True, fingerprint(base, i, self.shard_size))
                for i in range((n + self.shard_size - 1) // self.shard_size)]

    def metadata_table(self) -> pa.Table:
        table = self._load()
        shard = [f"{i // self.shard_size:05d}" for i in range(table.num_rows)]
        return table.append_column("shard", pa.array(shard)).append_column(
            "status", pa.array(["success"] * table.num_rows))

    def read_shard(self, shard: ShardRef, stats: ShardStats | None = None) -> Iterator[Sample | ReadIssue]:
        i = int(shard.name)
        rows = self._load().slice(i * self.shard_size, self.shard_size).to_pylist()
        folder = posixpath.dirname(self.loc.path)
        for row in rows:
            key, ref, caption = str(row["key"]), row[self.image_col], row[self.caption_col]
            if not ref:
                yield self._issue(shard, key, "missing_image", "row has no image path", stats, source=self.uri)
                continue
            try:
                if "://" in ref or ref.startswith("/"):
                    img = resolve(ref, what="image")
                    data, source = img.fs.cat_file(img.path), ref
                else:
                    path = posixpath.normpath(posixpath.join(folder, ref))
                    data, source = self.loc.fs.cat_file(path), self.loc.uri(path)
            except TTDError as exc:
                yield self._issue(shard, key, "bad_image_path", str(exc), stats, source=self.uri)
                continue
            except (OSError, ValueError) as exc:
                yield self._issue(shard, key, "missing_image", f"cannot read {ref!r}: {exc}", stats, source=self.uri)
                continue
            if stats is not None:
                stats.samples += 1
            yield Sample(self.name, shard.name, key, caption, data, row, source, self.max_pixels)
