import re
from pathlib import Path

import pyarrow as pa
import pytest

from ttd.errors import SchemaError
from ttd.store import schemas

REQUIRED = {"tags", "relevancy", "masks", "errors", "eval_predictions", "eval_counts", "metrics", "train_log",
            "manifest"}


def test_every_required_table_has_a_versioned_schema():
    loaded = schemas.all_schemas()
    assert REQUIRED <= set(loaded)
    for s in loaded.values():
        assert s.version >= 1
        assert isinstance(s.arrow, pa.Schema)


def test_readme_documents_every_column():
    text = (schemas.schema_dir() / "README.md").read_text()
    sections = dict(re.findall(r"^## `(\w+)`.*?\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    for name, s in schemas.all_schemas().items():
        assert name in sections, f"README has no section for {name}"
        documented = set(re.findall(r"^\| `(\w+)` \|", sections[name], flags=re.M))
        assert set(s.docs) == documented, (name, set(s.docs) ^ documented)


def test_unknown_table_and_version():
    with pytest.raises(SchemaError, match="unknown table"):
        schemas.get("nope")
    with pytest.raises(SchemaError, match="schema version 2"):
        schemas.check_version("tags", 2, "somewhere")
    schemas.check_version("tags", schemas.get("tags").version, "somewhere")


def test_conform_casts_and_orders_columns():
    s = schemas.get("errors")
    t = pa.table({"severity": ["error"], "key": [None], "stage": ["read"], "error_type": ["x"], "message": ["m"],
                  "source": ["f"]})
    out = s.conform(t)
    assert out.column_names == [f.name for f in s.arrow]
    assert out.schema.metadata[b"ttd.schema_version"] == b"1"


def test_schema_files_ship_in_the_source_tree():
    assert (Path(__file__).parent.parent / "storage_schemas" / "tags.json").is_file()
