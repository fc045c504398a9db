"""Corpus readers: img2dataset webdataset / parquet / files layouts and JSONL/CSV manifests, local or any fsspec URI."""

from __future__ import annotations

import posixpath

from ttd.corpus.base import DEFAULT_MAX_PIXELS, Caption, Corpus, ReadIssue, Sample, ShardRef, ShardStats, decode_image
from ttd.corpus.img2dataset import FilesCorpus, ParquetCorpus, WebDatasetCorpus
from ttd.corpus.manifest import ManifestCorpus
from ttd.errors import TTDError
from ttd.store.store import check_name
from ttd.store.uri import resolve

FORMATS = {"webdataset": WebDatasetCorpus, "parquet": ParquetCorpus, "files": FilesCorpus,
           "manifest": ManifestCorpus}

__all__ = ["Caption", "Corpus", "ReadIssue", "Sample", "ShardRef", "ShardStats", "FORMATS", "default_name",
           "open_corpus", "decode_image", "detect_format"]


def detect_format(loc) -> str:
    """Guess the layout from what the folder holds (or the manifest's extension), from one listing of the folder.
    On S3 the reader's own listing is then served from s3fs's cache, and an `exists` and an `isfile` first would
    cost four requests more."""
    fs = loc.fs
    try:
        entries = fs.ls(loc.path, detail=True)
    except FileNotFoundError:
        raise TTDError(f"corpus {loc.uri()!r} does not exist: check the path or URL") from None
    except NotADirectoryError:
        entries = [fs.info(loc.path)]
    except Exception as exc:  # network or permission trouble: still one clear line
        raise TTDError(f"cannot reach corpus {loc.uri()!r}: {type(exc).__name__}: {exc}") from None
    if [(e["name"].rstrip("/"), e["type"]) for e in entries] == [(loc.path, "file")]:  # ls of a file: the file
        if loc.path.endswith((".jsonl", ".json", ".csv")):
            return "manifest"
        raise TTDError(f"corpus {loc.uri()!r} is a file but not a .jsonl/.csv manifest")
    names = [(posixpath.basename(e["name"].rstrip("/")), e["type"]) for e in entries]
    if any(n.endswith(".tar") for n, _ in names):
        return "webdataset"
    if any(n.isdigit() and kind == "directory" for n, kind in names):
        return "files"
    if any(n.endswith(".parquet") for n, _ in names):
        return "parquet"
    raise TTDError(f"corpus {loc.uri()!r} holds no img2dataset shards (*.tar, *.parquet or NNNNN/ folders) and is "
                   "not a manifest: check the path, or pass --corpus-format")


def default_name(path: str) -> str:
    """A corpus's name in the store (its `corpus` partition) when none is given: the folder or file stem."""
    return posixpath.basename(path.rstrip("/")).split(".")[0] or "corpus"


def open_corpus(uri: str, *, fmt: str = "auto", name: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, **options) -> Corpus:
    """Open a corpus; its name (the `corpus` partition in the store) defaults to the folder or file stem."""
    loc = resolve(uri, must_exist=fmt != "auto", what="corpus")  # detecting the format finds a missing corpus
    fmt = detect_format(loc) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise TTDError(f"unknown corpus format {fmt!r}: use one of {', '.join(FORMATS)} or auto")
    if name is None:
        name = default_name(loc.path)
    return FORMATS[fmt](loc, check_name(name, "corpus"), max_pixels=max_pixels, **options)
