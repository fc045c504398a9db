import io
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_corpus, jpeg
from PIL import Image

from ttd.corpus import ReadIssue, Sample, ShardStats, open_corpus
from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.errors import ImageDecodeError, TTDError
from ttd.store.uri import resolve


def read_all(corpus):
    samples, issues, stats = [], [], []
    for shard in corpus.shards():
        st = ShardStats()
        for item in corpus.read_shard(shard, st):
            (samples if isinstance(item, Sample) else issues).append(item)
        stats.append(st)
    return samples, issues, stats


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_img2dataset_layouts_read_alike(tmp_path, fmt):
    uri = str(tmp_path / fmt)
    keys = build_corpus(uri, shards=3, per_shard=4, failed_per_shard=2, output_format=fmt)
    corpus = open_corpus(uri)
    assert corpus.format == fmt
    assert corpus.name == fmt
    assert [s.name for s in corpus.shards()] == ["00000", "00001", "00002"]
    assert all(s.complete for s in corpus.shards())
    samples, issues, stats = read_all(corpus)
    assert issues == []
    assert sorted(s.key for s in samples) == sorted(keys["success"])
    assert sum(st.skipped_status["failed_to_download"] for st in stats) == len(keys["failed"]) == 6
    s = samples[0]
    assert s.caption.startswith("a photo number")
    assert s.image().size == (32, 32) and s.image().mode == "RGB"


def test_manifest_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append({"image": f"img/{i}.jpg", "caption": f"caption {i}"})
    rows.append({"image": "img/missing.jpg", "caption": "gone"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "m.csv").write_text("image,caption\n" + "\n".join(f"{r['image']},{r['caption']}" for r in rows))
    for name in ("m.jsonl", "m.csv"):
        corpus = open_corpus(str(tmp_path / name), shard_size=4)
        assert corpus.format == "manifest"
        assert [s.name for s in corpus.shards()] == ["00000", "00001"]
        samples, issues, _ = read_all(corpus)
        assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003", "000010000"]
        assert [(i.key, i.error_type) for i in issues] == [("000010001", "missing_image")]
        assert samples[2].image().size == (32, 32)


def _shard_files(root):
    return {p.name: p for p in root.iterdir()}


def test_bad_samples_each_get_an_issue_and_good_ones_survive(tmp_path):
    root = resolve(str(tmp_path / "bad"))
    w = ShardWriter(root, 0)
    good = jpeg(1)
    w.add(make_key(0, 0), "good one", good, width=32, height=32)
    w.add(make_key(0, 1), "zero bytes", b"", width=32, height=32)
    w.add(make_key(0, 2), "not an image", b"hello, I am text", width=32, height=32)
    w.add(make_key(0, 3), "corrupt jpeg", good[: len(good) // 2], width=32, height=32)
    w.add(make_key(0, 4), None, good, width=32, height=32, caption_bytes=b"caf\xe9 au lait")
    w.add(make_key(0, 5), "good two", jpeg(2), width=32, height=32)
    w.close()
    corpus = open_corpus(root.path)
    samples, issues, _ = read_all(corpus)
    assert len(samples) == 6  # every sample reaches the stage; decoding is lazy
    assert [(i.key, i.error_type, i.severity) for i in issues] == [("000000004", "invalid_utf8", "warning")]
    by_key = {s.key: s for s in samples}
    assert by_key["000000004"].caption == "caf\ufffd au lait"
    kinds = {}
    for s in samples:
        try:
            s.image()
        except ImageDecodeError as exc:
            kinds[s.key] = exc.error_type
    assert kinds == {"000000001": "empty_image", "000000002": "not_an_image", "000000003": "corrupt_image"}


def test_decompression_bomb_refused_before_decoding(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    s = Sample("c", "00000", "k", "x", buf.getvalue(), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError) as exc:
        s.image()
    assert exc.value.error_type == "decompression_bomb"


def test_truncated_tar_keeps_samples_before_the_cut_and_names_the_rest(tmp_path):
    uri = str(tmp_path / "c")
    keys = build_corpus(uri, shards=1, per_shard=10, failed_per_shard=0)
    tar = tmp_path / "c" / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * 0.55)])
    samples, issues, _ = read_all(open_corpus(uri))
    kinds = [i.error_type for i in issues]
    assert kinds.count("truncated_shard") == 1
    missing = [i.key for i in issues if i.error_type == "missing_in_shard"]
    assert 3 <= len(samples) <= 7
    # nothing silently lost: every successful key is either a sample or an issue
    assert sorted([s.key for s in samples] + missing) == sorted(keys["success"])
    for s in samples:
        s.image()


def test_metadata_and_tar_disagree_both_ways(tmp_path):
    uri = str(tmp_path / "c")
    keys = build_corpus(uri, shards=1, per_shard=4, failed_per_shard=0)
    meta_path = tmp_path / "c" / "00000.parquet"
    meta = pq.read_table(meta_path)
    only_in_tar = keys["success"][0]
    meta = meta.filter(pa.compute.not_equal(meta["key"], only_in_tar))
    ghost = meta.slice(0, 1).to_pylist()[0] | {"key": "000009999"}
    meta = pa.concat_tables([meta, pa.Table.from_pylist([ghost], schema=meta.schema)])
    pq.write_table(meta, meta_path)
    samples, issues, _ = read_all(open_corpus(uri))
    assert sorted(s.key for s in samples) == sorted(keys["success"])  # the tar-only sample is kept
    assert sorted((i.key, i.error_type, i.severity) for i in issues) == [
        ("000000000", "missing_in_metadata", "warning"),
        ("000009999", "missing_in_shard", "error"),
    ]


def test_missing_stats_marks_shard_incomplete(tmp_path):
    uri = str(tmp_path / "c")
    build_corpus(uri, shards=2, per_shard=2)
    os.remove(tmp_path / "c" / "00001_stats.json")
    assert [(s.name, s.complete) for s in open_corpus(uri).shards()] == [("00000", True), ("00001", False)]


def test_shard_fingerprint_changes_with_input(tmp_path):
    uri = str(tmp_path / "c")
    build_corpus(uri, shards=1, per_shard=2)
    before = open_corpus(uri).shards()[0].fingerprint
    assert open_corpus(uri).shards()[0].fingerprint == before
    with open(tmp_path / "c" / "00000.tar", "ab") as f:
        f.write(b"\0" * 1024)
    assert open_corpus(uri).shards()[0].fingerprint != before


def test_nonexistent_and_unrecognised_corpus_are_clear_errors(tmp_path):
    with pytest.raises(TTDError, match="does not exist"):
        open_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TTDError, match="holds no img2dataset shards"):
        open_corpus(str(tmp_path / "empty"))
    with pytest.raises(TTDError, match="contains '..'"):
        open_corpus(str(tmp_path / "a" / ".." / "empty"))


def test_reading_is_streaming_not_whole_shard(tmp_path):
    """Peak Python memory while reading a 12 MB shard stays far below the shard's size."""
    root = resolve(str(tmp_path / "big"))
    w = ShardWriter(root, 0, encode_format="png")
    rng = np.random.default_rng(0)
    for i in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
        w.add(make_key(0, i), f"noise {i}", buf.getvalue(), width=256, height=256)
    w.close()
    size = (tmp_path / "big" / "00000.tar").stat().st_size
    assert size > 7_000_000
    corpus = open_corpus(str(tmp_path / "big"))
    shard = corpus.shards()[0]
    tracemalloc.start()
    n = 0
    for item in corpus.read_shard(shard):
        assert not isinstance(item, ReadIssue)
        n += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 40
    assert peak < size / 4, (peak, size)


def test_s3_corpus(s3_bucket):
    uri = f"{s3_bucket}/corpus"
    keys = build_corpus(uri, shards=2, per_shard=3)
    corpus = open_corpus(uri)
    assert corpus.format == "webdataset"
    samples, issues, _ = read_all(corpus)
    assert issues == []
    assert sorted(s.key for s in samples) == sorted(keys["success"])
    assert samples[0].image().size == (32, 32)


def test_tar_members_are_grouped_by_key(tmp_path):
    """A hand-made tar in webdataset order with a json member that is not a dict still reads."""
    path = tmp_path / "c"
    path.mkdir()
    with tarfile.open(path / "00000.tar", "w") as tar:
        for key in ("000000000", "000000001"):
            for ext, data in (("jpg", jpeg(3)), ("txt", b"hand made"), ("json", b"[1, 2]")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (path / "00000_stats.json").write_text("{}")
    samples, issues, _ = read_all(open_corpus(str(path)))
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert [i.error_type for i in issues] == ["missing_metadata"]


def _view(items):
    return [(i.key, i.error_type) if isinstance(i, ReadIssue) else (i.key, i.caption) for i in items]


def _both_ways(uri):
    corpus = open_corpus(uri)
    shard = corpus.shards()[0]
    full, captions = ShardStats(), ShardStats()
    a = _view(corpus.read_shard(shard, full))
    b = _view(corpus.read_captions(shard, captions))
    return a, b, full.as_dict(), captions.as_dict()


def test_read_captions_matches_read_shard_on_damaged_tars(tmp_path):
    """The fast caption-only tar scan yields what tarfile-based reading yields, cut or corrupted anywhere."""
    orig = tmp_path / "orig"
    build_corpus(str(orig), shards=1, per_shard=4, failed_per_shard=1)
    data = (orig / "00000.tar").read_bytes()
    rng = np.random.default_rng(0)
    variants = [data[:cut] for cut in range(0, len(data), 97)]
    for pos in rng.integers(0, len(data), 40):
        damaged = bytearray(data)
        damaged[pos] = (damaged[pos] + 1 + int(rng.integers(255))) % 256
        variants.append(bytes(damaged))
    work = tmp_path / "work"
    work.mkdir()
    for name in ("00000.parquet", "00000_stats.json"):
        (work / name).write_bytes((orig / name).read_bytes())
    for blob in variants:
        (work / "00000.tar").write_bytes(blob)
        a, b, sa, sb = _both_ways(str(work))
        assert a == b and sa == sb


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_read_captions_handles_pax_and_gnu_headers(tmp_path, fmt):
    """webdataset's writer emits a pax header per member (float mtimes); long names need extended headers."""
    build_corpus(str(tmp_path / "c"), shards=1, per_shard=3)
    src = (tmp_path / "c" / "00000.tar").read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(src)) as tin, tarfile.open(fileobj=out, mode="w", format=fmt) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            m.mtime = 1700000000.5
            if m.name.startswith("000000002"):
                m.name = "d" * 120 + "/" + m.name  # a name too long for a plain ustar header
            tout.addfile(m, io.BytesIO(data))
    (tmp_path / "c" / "00000.tar").write_bytes(out.getvalue())
    a, b, sa, sb = _both_ways(str(tmp_path / "c"))
    assert a == b and sa == sb
    assert [k for k, _ in b] == ["000000001", "000000002", "000000003"]


def _tar_of(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("buffer", [512, 1024, 3 * 512 + 100, 1 << 20])
def test_fast_scan_equals_the_exact_scan_across_buffer_boundaries(monkeypatch, buffer):
    from ttd.corpus import tarscan

    monkeypatch.setattr(tarscan, "SCAN_BUFFER", buffer)
    rng = np.random.default_rng(1)
    members = []
    for i, size in enumerate([0, 1, 511, 512, 513, 5000, 20, 2048, 700]):
        members.append((f"{i:09d}.jpg", rng.bytes(size)))
        members.append((f"{i:09d}.txt", f"caption {i} ".encode() * (size % 97 + 1)))
    blob = _tar_of(members)
    want = [(n, d if n.endswith(".txt") else None) for n, d in tarscan.scan(io.BytesIO(blob))]
    assert tarscan.fast_scan(io.BytesIO(blob)) == want
    assert [n for n, _ in want] == [n for n, _ in members]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    for cut in range(100, end + 512, 389):  # cut before the end-of-archive block: it gives up, never misreads
        assert tarscan.fast_scan(io.BytesIO(blob[:cut])) is None, cut


def test_fast_scan_gives_up_on_member_data_that_looks_like_a_header():
    from ttd.corpus import tarscan

    fake = bytearray(1024)
    fake[512 + 257:512 + 262] = b"ustar"  # a block inside the data with the ustar magic where a header has it
    blob = _tar_of([("000000000.jpg", bytes(fake)), ("000000000.txt", b"a dog")])
    assert tarscan.fast_scan(io.BytesIO(blob)) is None
    assert [n for n, _ in tarscan.scan(io.BytesIO(blob))] == ["000000000.jpg", "000000000.txt"]
