"""Stage `parse`: candidate tags, bad captions, incremental and resumable runs, processes, S3, SQL."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import build_corpus, committed_rows, jpeg, outside_rows

from ttd.configs import ParseConfig
from ttd.corpus import Caption, ReadIssue, ShardRef, open_corpus
from ttd.corpus.img2dataset_writer import ShardWriter, make_key
from ttd.errors import TTDError
from ttd.stages.parse import STAGE, parse_shard, run_parse
from ttd.store import schemas
from ttd.store.sql import query
from ttd.store.store import Store
from ttd.store.uri import resolve
from ttd.text.tags import CaptionParser, Parsed, TagColumns, clean_caption, compound_nouns


@pytest.fixture(scope="module")
def words():
    return CaptionParser("words")


def cands(parser, text):
    r = parser.parse([text])[0]
    assert not isinstance(r, Exception), r
    return [dict(zip(r._fields, values)) for values in zip(*r)]


# ---------------------------------------------------------------- candidates

def test_words_policy_keeps_every_word_in_order_with_exact_spans(words):
    """Two adjacent nouns are one candidate (the compound rule); an adjective-noun name is two words unless the
    opt-in list knows it."""
    text = "Two hot dogs and a fire truck near the traffic lights, what a moment!"
    got = cands(words, text)
    assert [c["text"] for c in got] == ["Two", "hot", "dogs", "and", "a", "fire truck", "near", "the",
                                       "traffic lights", "what", "a", "moment"]
    listed = cands(CaptionParser("words", compounds=True), text)
    assert [c["text"] for c in listed][:3] == ["Two", "hot dogs", "and"]
    assert listed[1]["is_compound"] and listed[1]["lemma"] == "hot dog" and listed[1]["pos"] == "NOUN"
    for c in got:
        assert text[c["char_start"]:c["char_end"]] == c["text"]
        assert c["lower"] == c["text"].lower()
    by = {c["text"]: c for c in got}
    assert by["dogs"]["lemma"] == "dog" and not by["dogs"]["is_compound"]
    assert by["fire truck"]["is_compound"] and by["traffic lights"]["lemma"] == "traffic light"
    assert [c["text"] for c in got if c["is_stop"]] == ["Two", "and", "a", "the", "what", "a"]
    assert not by["moment"]["is_stop"] and by["moment"]["is_alpha"] and not by["moment"]["is_compound"]
    assert by["Two"]["lemma"] == "two" and by["Two"]["pos"] == "NUM"


def test_lemmas_of_plurals_and_hyphenated_words(words):
    got = {c["text"]: c for c in cands(words, "three cats chasing mice past two t-shirts")}
    assert got["cats"]["lemma"] == "cat" and got["mice"]["lemma"] == "mouse"
    assert got["t-shirts"]["lemma"] == "t-shirt" and not got["t-shirts"]["is_compound"]
    assert got["chasing"]["lemma"] == "chase" and got["chasing"]["pos"] == "VERB"


def test_content_policy_drops_stop_words_and_punctuation():
    got = cands(CaptionParser("content"), "A dog and the cat, on a red sofa... near the fire hydrant!")
    assert [c["text"] for c in got] == ["dog", "cat", "red", "sofa", "near", "fire hydrant"]
    assert not any(c["is_stop"] for c in got)


def test_nouns_policy_keeps_only_nouns_and_compounds():
    got = cands(CaptionParser("nouns", compounds=True), "a happy dog running after two hot dogs on the beach in Paris")
    assert [c["text"] for c in got] == ["dog", "hot dogs", "beach", "Paris"]
    assert {c["pos"] for c in got} == {"NOUN", "PROPN"}


def test_tokenizer_only_mode():
    got = cands(CaptionParser("words", tagger=False, compounds=True), "Two Hot Dogs near the cats")
    assert [(c["text"], c["lemma"], c["pos"]) for c in got] == [
        ("Two", "two", None), ("Hot Dogs", "hot dog", None), ("near", "near", None), ("the", "the", None),
        ("cats", "cats", None)]  # no lemmatizer: the lower-case form; a listed compound: its listed singular


def test_nouns_without_tagger_is_a_clear_error():
    with pytest.raises(TTDError, match="needs POS tags"):
        CaptionParser("nouns", tagger=False)
    with pytest.raises(TTDError, match="needs POS tags"):
        from ttd.configs import build

        build(ParseConfig, {"policy": "nouns", "tagger": False})


def test_config_from_yaml_with_flag_overrides(tmp_path):
    from ttd.configs import load_yaml

    path = tmp_path / "parse.yaml"
    path.write_text("policy: content\nmax_caption_chars: 200\nworkers: 4\n")
    cfg = load_yaml(ParseConfig, path, {"workers": 2})
    assert (cfg.policy, cfg.max_caption_chars, cfg.workers, cfg.tagger) == ("content", 200, 2, True)
    assert set(cfg.output_config()) == {"policy", "tagger", "compounds", "noun_pairs", "max_caption_chars"}
    path.write_text("polcy: words\n")
    with pytest.raises(TTDError, match="polcy"):
        load_yaml(ParseConfig, path)


def test_compounds_can_be_switched_off_and_the_list_is_large():
    got = cands(CaptionParser("words", compounds=False), "a hot dog")
    assert [c["text"] for c in got] == ["a", "hot", "dog"]
    singulars = {s for _, s in compound_nouns()}
    assert len(singulars) >= 300 and {"hot dog", "fire truck", "teddy bear", "stop sign"} <= singulars


def test_identical_captions_are_parsed_once(words):
    before = words.parsed
    out = words.parse(["a red bus", "a cat", "a red bus", "a cat", "a red bus"])
    assert words.parsed - before <= 2
    assert out[0] is out[2] is out[4]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("raw,empty", [(None, True), ("", True), ("   \t\n ", True), ("\x00\x07", True),
                                       ("&nbsp;", True)])
def test_empty_captions(raw, empty):
    c = clean_caption(raw, 1000)
    assert c.empty is empty and c.text == ""


def test_bad_inputs_are_normalised_and_flagged():
    c = clean_caption("fish &amp; chips &lt;b&gt;hot&lt;/b&gt; rock&notes", 1000)
    assert c.text == "fish & chips <b>hot</b> rock&notes" and c.fixes == ("html_entities",)  # no legacy '&not'
    c = clean_caption("a\x00dog\x07\nbarks", 1000)
    assert c.text == "a dog  barks" and c.fixes == ("control_characters",) and len(c.text) == len("a\x00dog\x07\nbarks")
    c = clean_caption("lone \ud800 surrogate", 1000)
    assert c.text == "lone \ufffd surrogate" and "lone_surrogates" in c.fixes
    c = clean_caption("cafe\u0301", 1000)
    assert c.text == "caf\u00e9" and c.fixes == ("unicode_nfc",)
    for text in ("собака бежит по траве", "一只狗在草地上跑"):
        assert clean_caption(text, 1000).likely_not_english
    assert not clean_caption("a café in Zürich with a señor", 1000).likely_not_english
    assert not clean_caption("🐶🐶 dog emoji 🎉", 1000).likely_not_english
    long = ("word " * 20_000).strip()  # 99,999 characters
    c = clean_caption(long, 1000)
    assert c.truncated and len(c.text) <= 1000 and c.text.endswith("word") and c.n_chars_original == len(long)


def test_parser_survives_every_bad_caption(words):
    texts = [clean_caption(t, 1000).text for t in ("собака бежит", "一只狗在草地上跑", "🐶🐶 🎉", "lone \ud800",
                                                   "x" * 1000, "<b>dog</b>", "\u200b")]
    for t, r in zip(texts, words.parse(texts)):
        assert not isinstance(r, Exception)
        assert all(t[s:e] == x for x, s, e in zip(r.text, r.char_start, r.char_end))


class FakeCorpus:
    """Yields the given captions as one shard, so inputs no file format can carry (a lone surrogate) reach the stage."""

    name = "fake"

    def __init__(self, captions):
        self.captions = captions

    def read_captions(self, shard, stats=None):
        stats.errors += 1  # readers count their own issues
        yield ReadIssue("fake", "00000", "k-missing", "missing_in_shard", "gone", "error", "src")
        for i, c in enumerate(self.captions):
            stats.samples += 1
            yield Caption(f"k{i:02d}", c, "src")


BAD = [None, "", "   ", "word " * 20_000, "собака бежит по траве", "一只狗在草地上跑", "🐶 and 🐱", "&amp; &lt;b&gt;",
       "lone \ud800 surrogate", "ctrl\x00\x07chars", "a normal dog"]


def test_bad_captions_each_get_a_row_and_the_shard_commits(tmp_path):
    shard = ShardRef("fake", "00000", (), True, "fp")
    config = ParseConfig()
    result = parse_shard(FakeCorpus(BAD), shard, CaptionParser.from_config(config), config)
    store = Store(str(tmp_path / "s"), create=True)
    store.commit("parse", shard.partition, "fp", result.tables)  # every string is storable
    caps = {r["key"]: r for r in store.read("captions").to_pylist()}
    assert len(caps) == len(BAD)
    errs = sorted((r["key"], r["error_type"], r["severity"]) for r in store.read("errors").to_pylist())
    assert errs == [
        ("k-missing", "missing_in_shard", "error"),
        ("k00", "empty_caption", "error"), ("k01", "empty_caption", "error"), ("k02", "empty_caption", "error"),
        ("k03", "caption_truncated", "warning"),
        ("k04", "likely_not_english", "warning"), ("k05", "likely_not_english", "warning"),
        ("k07", "caption_normalised", "warning"), ("k08", "caption_normalised", "warning"),
        ("k09", "caption_normalised", "warning"),
    ]
    messages = {r["key"]: r["message"] for r in store.read("errors").to_pylist()}
    assert "html_entities" in messages["k07"] and "lone_surrogates" in messages["k08"]
    assert "control_characters" in messages["k09"] and "100000 characters" in messages["k03"].replace(",", "")
    assert caps["k00"]["n_chars_original"] is None and caps["k00"]["n_candidates"] == 0
    assert caps["k03"]["truncated"] and len(caps["k03"]["caption"]) <= 1000
    assert caps["k07"]["caption"] == "& <b>" and caps["k07"]["normalised"]
    assert caps["k08"]["caption"] == "lone \ufffd surrogate"
    tags = store.read("tags")
    assert set(tags["key"].to_pylist()) == {k for k, r in caps.items() if r["n_candidates"]}
    assert {"dog", "🐶", "🐱"} <= set(tags["text"].to_pylist())
    truncated = tags.filter(pc.field("key") == "k03")
    assert all(truncated["caption_truncated"].to_pylist()) and truncated.num_rows == caps["k03"]["n_candidates"]
    for r in tags.to_pylist():
        assert caps[r["key"]]["caption"][r["char_start"]:r["char_end"]] == r["text"]
    assert result.stats.errors == 4 and result.stats.warnings == 6


def test_a_caption_spacy_fails_on_is_an_error_row_not_a_lost_shard(tmp_path, monkeypatch):
    real = CaptionParser._candidates

    def flaky(self, caption, doc):
        if "boom" in caption:
            raise ValueError("simulated spaCy failure")
        return real(self, caption, doc)

    monkeypatch.setattr(CaptionParser, "_candidates", flaky)
    config = ParseConfig(dedupe=False)
    shard = ShardRef("fake", "00000", (), True, "fp")
    corpus = FakeCorpus(["a dog", "boom goes the cat", "a red bus"])
    result = parse_shard(corpus, shard, CaptionParser.from_config(config), config)
    errors = result.tables["errors"].to_pylist()
    assert [(e["key"], e["error_type"]) for e in errors[1:]] == [("k01", "parse_failed")]
    assert "simulated spaCy failure" in errors[1]["message"]
    assert set(result.tables["tags"]["key"].to_pylist()) == {"k00", "k02"}
    assert result.tables["captions"]["n_candidates"].to_pylist() == [2, 0, 3]


# ---------------------------------------------------------------- the stage

def manifests_state(store_uri):
    docs = Store(store_uri).manifests("parse")
    return {(d["shard"], d["fingerprint"], d["committed_at"]) for d in docs}


def file_mtimes(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def add_shard(uri, shard_id, n=3):
    w = ShardWriter(resolve(uri), shard_id)
    for i in range(n):
        w.add(make_key(shard_id, i), f"a dog and a teddy bear number {i}", jpeg(shard_id * 10 + i), width=32,
              height=32)
    w.close()


def test_stage_fills_tags_then_is_incremental(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    keys = build_corpus(corpus, shards=2, per_shard=4)
    first = run_parse(corpus, store)
    assert first["done"] == 2 and first["captions"] == 8 and first["errors"] == 0
    assert first["parsed"] == 8 and first["tags"] > 8
    tags = Store(store).read("tags")
    assert set(tags["key"].to_pylist()) == set(keys["success"])
    assert tags.group_by(["key", "tag_index"]).aggregate([]).num_rows == tags.num_rows
    # second run: nothing new, not even a manifest rewritten
    state, mtimes = manifests_state(store), file_mtimes(tmp_path / "s")
    again = run_parse(corpus, store)
    assert again["done"] == 0 and again["skipped_done"] == 2
    assert manifests_state(store) == state and file_mtimes(tmp_path / "s") == mtimes
    # a new shard is the only work
    add_shard(corpus, 2)
    third = run_parse(corpus, store)
    assert third["done"] == 1 and third["skipped_done"] == 2 and third["captions"] == 3
    assert state < manifests_state(store)
    # a changed config re-parses (new fingerprint), and replaces the old rows
    content = run_parse(corpus, store, ParseConfig(policy="content"))
    assert content["done"] == 3
    assert set(Store(store).read("tags")["policy"].to_pylist()) == {"content"}
    # the acceptance query
    rows = query(store, "SELECT lemma, count(*) AS n FROM tags GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20").to_pylist()
    assert rows[:2] == [{"lemma": "photo number", "n": 8}, {"lemma": "shard", "n": 8}]  # a noun pair merged
    joined = query(store, "SELECT count(*) AS n FROM tags t JOIN captions c USING (corpus, shard, key) "
                          "WHERE substr(c.caption, t.char_start + 1, t.char_end - t.char_start) = t.text").to_pylist()
    assert joined == [{"n": Store(store).read("tags").num_rows}]


def test_incomplete_shard_waits(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=2, per_shard=2)
    stats = tmp_path / "c" / "00001_stats.json"
    saved = stats.read_bytes()
    stats.unlink()
    first = run_parse(corpus, store)
    assert first["done"] == 1 and first["waiting"] == ["00001"]
    stats.write_bytes(saved)
    assert run_parse(corpus, store)["done"] == 1


def test_killed_run_resumes_without_duplicates(tmp_path, monkeypatch):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=3, per_shard=3)
    real = Store._atomic_write
    commits = {"n": 0}

    def crash_on_second_manifest(self, path, data):
        if "/manifests/parse/" in path:
            commits["n"] += 1
            if commits["n"] == 2:
                raise KeyboardInterrupt("killed between data and manifest")
        return real(self, path, data)

    monkeypatch.setattr(Store, "_atomic_write", crash_on_second_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_parse(corpus, store)
    monkeypatch.setattr(Store, "_atomic_write", real)
    assert len(Store(store).manifests("parse")) == 1
    assert set(Store(store).read("tags")["shard"].to_pylist()) == {"00000"}  # the orphan files are invisible
    resumed = run_parse(corpus, store)
    assert resumed["done"] == 2 and resumed["skipped_done"] == 1
    tags = Store(store).read("tags")
    assert tags.group_by(["key", "tag_index"]).aggregate([]).num_rows == tags.num_rows
    assert Store(store).read("captions").num_rows == 9


def test_a_shard_that_cannot_be_read_fails_alone_and_is_retried(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=3, per_shard=2)
    meta = tmp_path / "c" / "00001.parquet"
    saved = meta.read_bytes()
    meta.write_bytes(b"not a parquet file")
    first = run_parse(corpus, store)
    assert first["done"] == 2 and [f["shard"] for f in first["failed"]] == ["00001"]
    assert "00001" not in {d["shard"] for d in Store(store).manifests("parse")}
    meta.write_bytes(saved)
    second = run_parse(corpus, store)
    assert second["done"] == 1 and second["failed"] == [] and second["skipped_done"] == 2


def _sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["key"], r.get("tag_index", 0)))


def test_two_workers_give_the_same_tags_as_one(tmp_path):
    corpus = str(tmp_path / "c")
    build_corpus(corpus, shards=3, per_shard=3)
    one = run_parse(corpus, str(tmp_path / "s1"), ParseConfig(workers=1))
    two = run_parse(corpus, str(tmp_path / "s2"), ParseConfig(workers=2))
    assert one["done"] == two["done"] == 3 and one["tags"] == two["tags"]
    for table in ("tags", "captions"):
        assert _sorted_rows(Store(str(tmp_path / "s1")).read(table)) == \
            _sorted_rows(Store(str(tmp_path / "s2")).read(table))
    fps = [{d["shard"]: d["fingerprint"] for d in Store(str(tmp_path / s)).manifests("parse")} for s in ("s1", "s2")]
    assert fps[0] == fps[1]  # workers is speed, not output: no re-parse when it changes


def test_parquet_corpus_reads_captions_without_images(tmp_path):
    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    keys = build_corpus(corpus, shards=2, per_shard=3, output_format="parquet")
    summary = run_parse(corpus, store, ParseConfig(tagger=False))
    assert summary["captions"] == 6 and summary["format"] == "parquet"
    assert set(Store(store).read("captions")["key"].to_pylist()) == set(keys["success"])


def test_stage_on_s3(s3_bucket):
    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    keys = build_corpus(corpus, shards=2, per_shard=2)
    assert run_parse(corpus, store)["done"] == 2
    assert run_parse(corpus, store)["skipped_done"] == 2
    rows = query(store, "SELECT count(DISTINCT key) AS n FROM tags").to_pylist()
    assert rows == [{"n": len(keys["success"])}]
    manifest = json.loads(resolve(store).fs.cat_file(f"{store}/manifests/parse/corpus=corpus/shard=00000.json"))
    assert manifest["model_id"].startswith("spacy/") and manifest["config"]["policy"] == "words"
    assert schemas.get("tags").version == manifest["schema_versions"]["tags"]


def test_a_run_opens_and_tidies_an_s3_store_in_a_request_each(s3_endpoint, s3_bucket, monkeypatch):
    """Every run opens its store and corpus before it plans, and looks for what killed runs left at its end: on S3
    the store's marker and the corpus's registration are one GET each (not an exists, a size and a read), the
    corpus one listing, which detects the format and is the plan's listing too (not an exists and an isfile
    first), and the empty claims and staging folders one listing each (not three): ten requests fewer a run,
    some 200 ms at 20 ms of latency."""
    import s3fs
    from faultproxy import FaultProxy

    from ttd.store.claims import clear_leftovers

    corpus, store = f"{s3_bucket}/corpus", f"{s3_bucket}/store"
    build_corpus(corpus, shards=3, per_shard=1)
    assert run_parse(corpus, store, ParseConfig(tagger=False))["done"] == 3
    with FaultProxy(s3_endpoint, {}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        opened_store = Store(store)
        assert opened_store.corpus("corpus")["format"] == "webdataset"
        opened = open_corpus(corpus)
        assert opened.format == "webdataset" and [s.name for s in opened.shards()] == ["00000", "00001", "00002"]
        clear_leftovers(opened_store, STAGE)
    bucket = s3_bucket.removeprefix("s3://")

    def requests(part: str) -> list[str]:
        return [line for line in proxy.lines if part in line]

    assert requests("/store/_ttd_store.json") == [f"GET /{bucket}/store/_ttd_store.json HTTP/1.1"], proxy.lines
    assert requests("/store/corpora/") == [f"GET /{bucket}/store/corpora/corpus.json HTTP/1.1"], proxy.lines
    assert len(requests("prefix=corpus/")) == 1 and not requests(f"HEAD /{bucket}/corpus"), proxy.lines
    for folder in ("claims", "_staging"):
        assert [line.split("&delimiter")[0] for line in requests(f"store/{folder}")] == \
            [f"GET /{bucket}?list-type=2&prefix=store/{folder}/{STAGE}/"], proxy.lines


@pytest.mark.parametrize("policy", ["words", "content"])
def test_batched_tokenizer_path_equals_the_per_caption_path(monkeypatch, policy):
    """Without the tagger, captions are tokenised many at a time as one Doc and candidates built with array
    operations; the result must be exactly what tokenising each caption alone gives."""
    from ttd.text import tags

    monkeypatch.setattr(tags, "FAST_CHUNK", 4)  # several chunks, captions at every chunk edge
    texts = ["Two hot dogs and a fire truck near the traffic lights, what a moment!", "hot", "dog hot dog",
             "mother-in-law's t-shirt x-ray - a - b", "a-b-c--d -e f- g", "  leading and trailing  ", "🐶🐶 dog 🎉",
             "собака бежит", "don't can't I'm", "http://example.com/a-b.jpg dog", "e-mail: a@b.com",
             "(hot dog)", "hot\u00a0dog", "end-", "-start", "U.S.A. dogs.", ":) :-( smile", "Hot Dogs",
             "hot-dog stand", "ice cream cone ice cream", "the a of", "teddy bears' picnic", "x" * 300]
    parser = CaptionParser(policy, tagger=False)
    fast = parser.parse_columns(texts)
    slow = TagColumns.from_parsed(parser._parse_all(texts))
    assert fast.caption.tolist() == slow.caption.tolist() and len(fast) > 40
    for name in Parsed._fields:
        a, b = fast.columns[name], slow.columns[name]
        assert (a.to_pylist() if isinstance(a, pa.Array) else a.tolist()) == \
               (b.to_pylist() if isinstance(b, pa.Array) else b.tolist()), name
    for i, s, e, t in zip(fast.caption.tolist(), fast.columns["char_start"].tolist(),
                          fast.columns["char_end"].tolist(), fast.columns["text"].to_pylist()):
        assert texts[i][s:e] == t


def test_two_corpora_in_folders_of_the_same_name_never_share_rows(tmp_path):
    """`A/train` then `B/train` into one store: both default to the name "train" and the second would land in the
    first's partitions, replacing its rows. The store refuses it with one clear line (A's rows intact); under its
    own name B sits beside A; distill refuses to read B's images against A's labels."""
    from ttd.stages.distill import run_distill

    a, b, store = str(tmp_path / "A" / "train"), str(tmp_path / "B" / "train"), str(tmp_path / "store")
    build_corpus(a, shards=2, per_shard=12, failed_per_shard=0)
    build_corpus(b, shards=3, per_shard=12, failed_per_shard=0)
    assert run_parse(a, store, ParseConfig(tagger=False))["captions"] == 24
    with pytest.raises(TTDError, match=r"already holds a corpus named 'train', from .*A/train.*--corpus-name"):
        run_parse(b, store, ParseConfig(tagger=False))
    assert Store(store).read("captions").num_rows == 24
    run_parse(b, store, ParseConfig(tagger=False), name="train-b")
    rows = query(store, "SELECT corpus, count(*) AS n FROM captions GROUP BY corpus").to_pylist()
    counts = {r["corpus"]: r["n"] for r in rows}
    assert counts == {"train": 24, "train-b": 36}
    with pytest.raises(TTDError, match="already holds a corpus named 'train'"):
        run_distill(b, store, str(tmp_path / "out"))


class Killed(BaseException):
    """What a SIGKILL does to the code after it: nothing more runs (not caught as one shard's failure)."""


def test_what_is_committed_is_exactly_what_outside_readers_see(tmp_path, monkeypatch):
    """Plain DuckDB and Polars over the folders count exactly the committed rows after a run stopped inside a
    shard's commit: staged files are invisible (the next run removes them), and a commit stopped between moving
    files into place and its manifest removes what it moved. (A SIGKILL there cannot: tests/test_reliability.py's
    kill tests show the next run removing that orphan.)"""
    corpus, store = str(tmp_path / "corpus"), str(tmp_path / "store")
    build_corpus(corpus, shards=4, per_shard=3)
    cfg = ParseConfig(tagger=False)
    cols = {"tags": ["corpus", "shard", "key", "tag_index", "text"], "captions": ["corpus", "shard", "key", "caption"],
            "errors": ["corpus", "shard", "key", "error_type"]}

    def same_for_every_reader() -> None:
        for table, c in cols.items():
            assert outside_rows(store, table, c) == dict.fromkeys(("duckdb", "polars"), committed_rows(store, table, c))

    run_parse(corpus, store, cfg, shards=["00000", "00001"])

    def killed_in(method: str, shard: str, where: str) -> None:
        """Run parse on `shard`, killed at the first `Store.<method>` call whose first argument (a path, or a list
        of moves) names `where`."""
        real = getattr(Store, method)

        def kill(self, path, *other):
            if where in str(path) and f"shard={shard}" in str(path):
                raise Killed
            return real(self, path, *other)

        monkeypatch.setattr(Store, method, kill)
        with pytest.raises(Killed):
            run_parse(corpus, store, cfg, shards=[shard])
        monkeypatch.undo()

    killed_in("_move_all", "00002", "_staging")  # the shard's files staged, none moved into place
    assert list((tmp_path / "store" / "_staging").rglob("*.parquet"))
    same_for_every_reader()
    assert {r[1] for r in committed_rows(store, "tags", ["corpus", "shard"])} == {"00000", "00001"}
    killed_in("_atomic_write", "00003", "manifests/parse")  # the files moved into place, the manifest not written
    assert not list((tmp_path / "store" / "tables" / "tags" / "corpus=corpus" / "shard=00003").glob("*.parquet"))
    same_for_every_reader()
    # the next run, under another config (another fingerprint, so no file is simply overwritten), redoes everything
    summary = run_parse(corpus, store, ParseConfig(tagger=False, max_caption_chars=500))
    assert summary["done"] == 4 and not summary["failed"]
    same_for_every_reader()
    for table in cols:  # one file per shard and table: the old fingerprint's files are gone
        folders = list((tmp_path / "store" / "tables" / table).glob("corpus=*/shard=*"))
        assert len(folders) == 4 and all(len(list(f.glob("*.parquet"))) == 1 for f in folders), table
    assert not [p for p in (tmp_path / "store" / "_staging").rglob("*") if p.is_file()]  # staged leftovers removed


def test_a_batch_handed_its_planned_shards_does_not_plan_again(tmp_path, monkeypatch):
    """The flow plans once; a batch given its planned shards neither lists the corpus nor reads manifests."""
    from ttd.corpus.img2dataset import WebDatasetCorpus
    from ttd.stages.engine import PlannedShard, plan
    from ttd.stages.parse import stage_spec
    from ttd.text.nlp import english_model_id

    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=3, per_shard=2)
    cfg = ParseConfig(tagger=False)
    planned = plan(open_corpus(corpus), Store(store, create=True), stage_spec(cfg, english_model_id()))
    handed = [PlannedShard.from_dict(json.loads(json.dumps(p.as_dict()))) for p in planned[:2]]  # a task parameter

    def no_listing(*args, **kwargs):
        raise AssertionError("the batch planned again")

    monkeypatch.setattr(WebDatasetCorpus, "shards", no_listing)
    monkeypatch.setattr("ttd.stages.parse.plan", no_listing)
    summary = run_parse(corpus, store, cfg, planned=handed)
    assert summary["done"] == 2 and summary["shards"] == 2
    monkeypatch.undo()
    assert run_parse(corpus, store, cfg)["done"] == 1  # the third, left out of the batch


def test_a_run_that_commits_a_few_shards_lists_the_manifests_once(tmp_path, monkeypatch):
    """A nightly run that finds a few new shards reads the stage's manifests for its plan only: listing them all
    again at its end would not rewrite the index for so few (the next plan reads them), and costs as much as the
    plan on S3. A run that commits many brings the index up to date."""
    from ttd.store.store import INDEX_REWRITE_AFTER

    corpus, store = str(tmp_path / "c"), str(tmp_path / "s")
    build_corpus(corpus, shards=2, per_shard=1)
    cfg = ParseConfig(tagger=False)
    listings = []
    real = Store.manifests

    def counting(self, stage=None, prefix=None, **kw):
        listings.append(stage)
        return real(self, stage, prefix, **kw)

    monkeypatch.setattr(Store, "manifests", counting)
    assert run_parse(corpus, store, cfg)["done"] == 2
    assert listings.count(STAGE) == 1
    add_shard(corpus, 2)
    listings.clear()
    assert run_parse(corpus, store, cfg)["done"] == 1 and listings.count(STAGE) == 1
    listings.clear()
    assert run_parse(corpus, store, cfg)["skipped_done"] == 3 and listings.count(STAGE) == 1
    for s in range(3, 3 + INDEX_REWRITE_AFTER):
        add_shard(corpus, s)
    listings.clear()
    assert run_parse(corpus, store, cfg)["done"] == INDEX_REWRITE_AFTER and listings.count(STAGE) == 2
    assert (tmp_path / "s" / "manifests" / "_index" / f"{STAGE}.parquet").exists()
