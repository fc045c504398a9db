"""Write shards in img2dataset's output layouts, byte-for-byte deterministic.

Used by TagMask-Synth and by tests that build img2dataset-format corpora. Layouts (img2dataset's own):

- ``webdataset``: ``00000.tar`` holding ``KEY.jpg``, ``KEY.txt``, ``KEY.json``; sibling ``00000.parquet`` with a
  row per input (failed ones too) and ``00000_stats.json`` written last (its presence marks a finished shard).
- ``parquet``: ``00000.parquet`` with the image bytes in a binary column named after the encode format.
- ``files``: ``00000/KEY.jpg`` with ``KEY.txt`` and ``KEY.json`` beside it, plus the sibling parquet and stats.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ttd.store.uri import Location

OUTPUT_FORMATS = ("webdataset", "parquet", "files")

# img2dataset's metadata columns, in its order; extra per-sample fields are appended after them.
BASE_COLUMNS = [
    ("url", pa.string()),
    ("caption", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def make_key(shard_id: int, index: int, digits: int = 4) -> str:
    """img2dataset's default key: 5 digits of shard then `digits` digits of index within it."""
    return f"{shard_id:05d}{index:0{digits}d}"


class ShardWriter:
    """Collects one shard's samples and writes them in an img2dataset layout on `close()`.

    Samples are streamed into the tar (webdataset) or files as they arrive; only metadata rows are kept.
    """

    def __init__(
        self,
        root: Location,
        shard_id: int,
        output_format: str = "webdataset",
        encode_format: str = "jpg",
        extra_columns: list[tuple[str, pa.DataType]] | None = None,
        write_stats: bool = True,
    ):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        self.root = root
        self.name = shard_name(shard_id)
        self.output_format = output_format
        self.encode_format = encode_format
        self.extra_columns = list(extra_columns or [])
        self.write_stats = write_stats
        self.rows: list[dict[str, Any]] = []
        self.images: list[bytes | None] = []
        self._tar_file = None
        self._tar = None
        root.fs.makedirs(root.path, exist_ok=True)
        if output_format == "webdataset":
            self._tar_file = root.fs.open(root.join(f"{self.name}.tar"), "wb")
            self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.USTAR_FORMAT)
        elif output_format == "files":
            root.fs.makedirs(root.join(self.name), exist_ok=True)

    def _put(self, name: str, data: bytes) -> None:
        if self._tar is not None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # deterministic bytes: no clock, owner or host in the archive
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        else:
            with self.root.fs.open(self.root.join(self.name, name), "wb") as f:
                f.write(data)

    def add(
        self,
        key: str,
        caption: str | None,
        image: bytes | None,
        *,
        width: int | None = None,
        height: int | None = None,
        url: str | None = None,
        status: str = "success",
        error_message: str | None = None,
        extra: dict[str, Any] | None = None,
        caption_bytes: bytes | None = None,
    ) -> None:
        """Add one input row. Rows with a status other than ``success`` get metadata only, like img2dataset.

        `caption_bytes` overrides the ``.txt`` payload (tests use it to write invalid UTF-8).
        """
        extra = dict(extra or {})
        row = {
            "url": url if url is not None else f"synthetic://{key}",
            "caption": caption,
            "key": key,
            "status": status,
            "error_message": error_message,
            "width": width if status == "success" else None,
            "height": height if status == "success" else None,
            "original_width": width if status == "success" else None,
            "original_height": height if status == "success" else None,
            "exif": None,
            "sha256": hashlib.sha256(image).hexdigest() if (image is not None and status == "success") else None,
        }
        for name, _ in self.extra_columns:
            row[name] = extra.get(name)
        self.rows.append(row)
        if status != "success":
            self.images.append(None)
            return
        if self.output_format == "parquet":
            self.images.append(image)
            return
        meta = {k: v for k, v in row.items() if k not in ("exif",)}
        self._put(f"{key}.{self.encode_format}", image or b"")
        self._put(f"{key}.txt", caption_bytes if caption_bytes is not None else (caption or "").encode("utf-8"))
        self._put(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))

    def close(self) -> dict[str, int]:
        """Finish the shard: tar, metadata parquet, then the stats file last. Returns the stats."""
        if self._tar is not None:
            self._tar.close()
            self._tar_file.close()
        fields = [pa.field(n, t) for n, t in BASE_COLUMNS + self.extra_columns]
        columns = {f.name: [r[f.name] for r in self.rows] for f in fields}
        if self.output_format == "parquet":
            fields.append(pa.field(self.encode_format, pa.binary()))
            columns[self.encode_format] = self.images
        table = pa.Table.from_pydict(columns, schema=pa.schema(fields))
        with self.root.fs.open(self.root.join(f"{self.name}.parquet"), "wb") as f:
            pq.write_table(table, f, compression="zstd")
        statuses: dict[str, int] = {}
        for r in self.rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        stats = {
            "count": len(self.rows),
            "successes": statuses.get("success", 0),
            "failed_to_download": statuses.get("failed_to_download", 0),
            "failed_to_resize": statuses.get("failed_to_resize", 0),
            "status_dict": dict(sorted(statuses.items())),
        }
        if self.write_stats:
            with self.root.fs.open(self.root.join(f"{self.name}_stats.json"), "w") as f:
                f.write(json.dumps(stats, indent=2, sort_keys=True))
        return stats
