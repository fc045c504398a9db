"""Versioned table schemas: loaded from `storage_schemas/*.json`, checked on every write and read.

Each data file carries `ttd.table` and `ttd.schema_version` in its Parquet metadata; each manifest records the
versions it committed. A version this code does not know is an error, never a silent misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import pyarrow as pa

from ttd.errors import SchemaError

_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "binary": pa.binary(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "list<string>": pa.list_(pa.string()),
    "list<float32>": pa.list_(pa.float32()),
    "list<int32>": pa.list_(pa.int32()),
}

META_TABLE = b"ttd.table"
META_VERSION = b"ttd.schema_version"


def schema_dir() -> Path:
    """storage_schemas/ ships inside the wheel as ttd/storage_schemas; in a checkout it sits beside ttd/."""
    packaged = resources.files("ttd") / "storage_schemas"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "storage_schemas"


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    description: str
    partitioning: tuple[str, ...]
    arrow: pa.Schema  # data columns only; partition columns live in the hive path
    docs: dict[str, str]
    kind: str = "parquet"  # "json" for manifests

    def metadata(self) -> dict[bytes, bytes]:
        return {META_TABLE: self.name.encode(), META_VERSION: str(self.version).encode()}

    def conform(self, table: pa.Table) -> pa.Table:
        """Return `table` with exactly this schema's columns and types, or raise SchemaError saying what differs."""
        names = set(table.column_names)
        want = [f.name for f in self.arrow]
        missing = [n for n in want if n not in names]
        extra = sorted(names - set(want))
        if missing or extra:
            raise SchemaError(
                f"table {self.name!r} v{self.version}: missing columns {missing}, unexpected columns {extra}"
            )
        table = table.select(want)
        for f in self.arrow:
            col = table.column(f.name)
            if not f.nullable and col.null_count:
                raise SchemaError(f"table {self.name!r}: column {f.name!r} may not hold nulls ({col.null_count} found)")
        try:
            return table.cast(self.arrow.with_metadata(self.metadata()), safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"table {self.name!r}: a column has the wrong type: {exc}") from None


def _parse(doc: dict, source: str) -> TableSchema:
    try:
        fields, docs = [], {}
        for c in doc["columns"]:
            docs[c["name"]] = c["doc"]
            if c["type"] == "json":  # manifest fields: JSON values, no arrow type
                continue
            fields.append(pa.field(c["name"], _TYPES[c["type"]], nullable=c["nullable"]))
        for p in doc.get("partitioning", []):
            docs[p["name"]] = p["doc"]
        return TableSchema(
            name=doc["table"],
            version=int(doc["version"]),
            description=doc["description"],
            partitioning=tuple(p["name"] for p in doc.get("partitioning", [])),
            arrow=pa.schema(fields),
            docs=docs,
            kind=doc.get("kind", "parquet"),
        )
    except (KeyError, TypeError) as exc:
        raise SchemaError(f"schema file {source} is malformed: {exc!r}") from None


@cache
def all_schemas() -> dict[str, TableSchema]:
    out = {}
    for path in sorted(schema_dir().glob("*.json")):
        schema = _parse(json.loads(path.read_text()), str(path))
        out[schema.name] = schema
    if not out:
        raise SchemaError(f"no schema files found in {schema_dir()}: the installation is incomplete")
    return out


def get(table: str) -> TableSchema:
    try:
        return all_schemas()[table]
    except KeyError:
        raise SchemaError(f"unknown table {table!r}; known tables: {', '.join(sorted(all_schemas()))}") from None


def parquet_tables() -> list[str]:
    return [n for n, s in all_schemas().items() if s.kind == "parquet"]


def check_version(table: str, version: int | str | None, where: str) -> None:
    """Refuse data written under a schema version this code does not know."""
    schema = get(table)
    if version is None or str(version) != str(schema.version):
        raise SchemaError(
            f"{where}: table {table!r} was written with schema version {version}, but this ttd reads version "
            f"{schema.version}; use the ttd release that wrote it, or re-run the stage into a new store"
        )
