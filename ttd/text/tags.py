"""Candidate tags from captions: caption normalisation, then spaCy tokens (and POS, lemmas) turned into candidates.

`clean_caption` makes any input safe to parse and to store (offsets stay meaningful: every tag's `char_start` and
`char_end` index the cleaned caption, which the `captions` table stores). `CaptionParser` runs only the spaCy
components a policy needs and returns, per caption, the candidates as columns ready for the `tags` table.
docs/METHOD.md says which choices come from the paper and which are ours.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttd.errors import TTDError
from ttd.text.nlp import english_components, load_english

log = logging.getLogger(__name__)

POLICIES = ("words", "content", "nouns")
TAGGER_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler", "lemmatizer")  # POS + lemmas; never parser or NER
NOUN_POS = frozenset({"NOUN", "PROPN"})
_PAIR_TAGS = ("NN", "NNS")  # noun pairs: a singular modifier ("fire") before a noun ("truck", "trucks")
MAX_STRINGS = 2_000_000  # spaCy strings per process before the model is reloaded (about 100 MB)
FAST_CHUNK = 8192  # captions tokenised as one Doc on the tokenizer-only path

# ---------------------------------------------------------------- caption normalisation

# Only terminated entities: html.unescape alone also expands legacy prefixes, so "rock&notes" would become "rock¬es".
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LAYOUT = re.compile("[\t\n\r]")
_PRECUT = 32  # normalise at most this many times the limit: bounds the work on a pathological caption


class CleanCaption(NamedTuple):
    """A caption made safe to parse and store. `text` is what tag offsets index. (A tuple: one per sample.)"""

    text: str
    n_chars_original: int | None  # None: the caption was missing
    truncated: bool
    changed: bool  # text differs from the input (before truncation)
    fixes: tuple[str, ...]  # what normalisation fixed: html_entities, lone_surrogates, control_characters, unicode_nfc
    empty: bool
    non_latin_share: float  # share of letters outside the Latin script

    @property
    def likely_not_english(self) -> bool:
        return self.non_latin_share > 0.5


def _normalise(text: str) -> tuple[str, tuple[str, ...]]:
    fixes = []
    if "&" in text:
        unescaped = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
        if unescaped != text:
            text = unescaped
            fixes.append("html_entities")
    fixed = _SURROGATE.sub("\ufffd", text)  # lone surrogates cannot be encoded as UTF-8 (Parquet would refuse)
    if fixed != text:
        text = fixed
        fixes.append("lone_surrogates")
    fixed = _CONTROL.sub(" ", text)  # one character for one: offsets after it do not move
    if fixed != text:
        text = fixed
        fixes.append("control_characters")
    text = _LAYOUT.sub(" ", text)  # tabs and line breaks are ordinary in alt-text: replaced, not reported
    fixed = unicodedata.normalize("NFC", text)
    if fixed != text:
        text = fixed
        fixes.append("unicode_nfc")
    return text, tuple(fixes)


def non_latin_share(text: str) -> float:
    """Share of the letters outside the Latin script (a cheap language hint: Cyrillic, CJK, Arabic...)."""
    if text.isascii():
        return 0.0
    letters = other = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
            code = ord(ch)
            if code > 0x24F and not 0x1E00 <= code <= 0x1EFF:  # Latin blocks: Basic..Extended-B, Extended Additional
                other += 1
    return other / letters if letters else 0.0


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, ending at a word boundary when one is in the last half."""
    for i in range(limit, limit // 2, -1):
        if text[i].isspace():
            return text[:i].rstrip()
    return text[:limit]


def clean_caption(raw: object, max_chars: int) -> CleanCaption:
    """Normalise (entities, surrogates, control characters, NFC), then truncate to `max_chars`."""
    if raw is None:
        return CleanCaption("", None, False, False, (), True, 0.0)
    if not isinstance(raw, str):
        raw = str(raw)
    head = raw[: max_chars * _PRECUT]
    text, fixes = head, ()
    if not (text.isascii() and text.isprintable() and "&" not in text):  # the common case needs no work
        text, fixes = _normalise(text)
    changed = text != head
    if not text.strip():
        return CleanCaption("", len(raw), False, changed, fixes, True, 0.0)
    truncated = len(raw) > max_chars * _PRECUT or len(text) > max_chars
    if len(text) > max_chars:
        text = _cut(text, max_chars)
    return CleanCaption(text, len(raw), truncated, changed, fixes, False, non_latin_share(text))


# ---------------------------------------------------------------- compound nouns

COMPOUNDS_RESOURCE = "compound_nouns.txt"


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


@cache
def compound_nouns() -> tuple[tuple[str, str], ...]:
    """(form, singular) for every listed multi-word noun and its plural, from ttd/data/compound_nouns.txt."""
    text = (resources.files("ttd") / "data" / COMPOUNDS_RESOURCE).read_text(encoding="utf-8")
    forms: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        singular, _, plural = (part.strip().lower() for part in line.partition("|"))
        singular = " ".join(singular.split())
        forms.setdefault(singular, singular)
        forms.setdefault(" ".join(plural.split()) or _plural(singular), singular)
    return tuple(sorted(forms.items()))


def compounds_digest() -> str:
    """Changes when the list changes: part of the parse fingerprint."""
    return hashlib.sha256(repr(compound_nouns()).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- spaCy

@cache
def english_pipeline(tagger: bool):
    """The English model with only what is needed: tokenizer alone, or tokenizer + tagger + lemmatizer. One per
    process: loading costs about a second, parsing a caption about a millisecond."""
    keep = TAGGER_COMPONENTS if tagger else ()
    exclude = [c for c in english_components() if c not in keep]
    nlp = load_english(exclude=exclude)
    missing = [c for c in keep if c not in nlp.pipe_names]
    if missing:
        raise TTDError(f"the installed spaCy English model lacks {missing}: reinstall it ({nlp.meta.get('name')})")
    return nlp


class Parsed(NamedTuple):
    """One caption's candidates, as columns of the `tags` table (in caption order)."""

    text: tuple[str, ...]
    lower: tuple[str, ...]
    lemma: tuple[str, ...]
    pos: tuple[str | None, ...]
    char_start: tuple[int, ...]
    char_end: tuple[int, ...]
    is_stop: tuple[bool, ...]
    is_alpha: tuple[bool, ...]
    is_compound: tuple[bool, ...]

    def __len__(self) -> int:  # the number of candidates, not of columns
        return len(self.text)


_EMPTY = Parsed((), (), (), (), (), (), (), (), ())
_STRING_FIELDS = ("text", "lower", "lemma", "pos")


@dataclass
class TagColumns:
    """Candidates of many captions as columns (the `tags` table's, in Parsed._fields order), rows grouped by
    caption in input order and in caption order within one. `caption` says which input each row belongs to;
    `failed` holds the inputs spaCy failed on (they have no rows)."""

    caption: np.ndarray  # int64, non-decreasing
    columns: dict[str, pa.Array | np.ndarray]
    failed: dict[int, Exception]

    def __len__(self) -> int:
        return len(self.caption)

    def counts(self, n_captions: int) -> np.ndarray:
        return np.bincount(self.caption, minlength=n_captions)

    @classmethod
    def from_parsed(cls, results: Sequence[Parsed | Exception], offset: int = 0) -> TagColumns:
        ok = [(i, r) for i, r in enumerate(results) if isinstance(r, Parsed)]
        counts = np.array([len(r) for _, r in ok], dtype=np.int64)
        caption = np.repeat(np.array([i for i, _ in ok], dtype=np.int64), counts) + offset
        columns: dict[str, pa.Array | np.ndarray] = {}
        for j, name in enumerate(Parsed._fields):
            values = [v for _, r in ok for v in r[j]]
            columns[name] = (pa.array(values, pa.string()) if name in _STRING_FIELDS else
                             np.array(values, dtype=bool if name.startswith("is_") else np.int32))
        failed = {i + offset: r for i, r in enumerate(results) if isinstance(r, Exception)}
        return cls(caption, columns, failed)

    @classmethod
    def concat(cls, parts: Sequence[TagColumns]) -> TagColumns:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.from_parsed([])
        columns = {name: (pa.concat_arrays([p.columns[name] for p in parts]) if name in _STRING_FIELDS else
                          np.concatenate([p.columns[name] for p in parts])) for name in Parsed._fields}
        return cls(np.concatenate([p.caption for p in parts]), columns,
                   {k: v for p in parts for k, v in p.failed.items()})

    def take(self, rows: np.ndarray, caption: np.ndarray) -> TagColumns:
        """These rows, in this order, relabelled with `caption`."""
        columns = {name: (pc.take(col, pa.array(rows)) if isinstance(col, pa.Array) else col[rows])
                   for name, col in self.columns.items()}
        return TagColumns(caption, columns, {})


class _Lex(NamedTuple):
    text: str
    lower: str
    is_stop: bool
    is_alpha: bool
    is_word: bool  # has a letter, digit or symbol such as an emoji: not punctuation, not space


def _is_word(text: str) -> bool:
    return any(ch.isalnum() or unicodedata.category(ch) == "So" for ch in text)


@dataclass(frozen=True, slots=True)
class _Merge:
    start: int
    end: int  # token indices, end exclusive
    lemma: str | None  # the listed singular of a listed compound
    compound: bool  # a multi-word noun (False: a hyphenated word such as "t-shirt")
    rank: int  # ties between equally long spans: listed compounds, then hyphenated words, then noun pairs


class CaptionParser:
    """Turns caption texts into candidates under one policy. Reuse it across shards: it keeps the model, a
    per-lexeme cache and (with `cache_size`) the results of recent captions."""

    @classmethod
    def from_config(cls, config) -> CaptionParser:
        """The parser a `ttd.configs.ParseConfig` describes."""
        return cls(config.policy, tagger=config.tagger, compounds=config.compounds, noun_pairs=config.noun_pairs,
                   batch_size=config.batch_size, cache_size=config.cache_size if config.deduplicate else 0)

    def __init__(self, policy: str = "words", *, tagger: bool = True, compounds: bool = False,
                 noun_pairs: bool = True, batch_size: int = 256, cache_size: int = 0):
        if policy not in POLICIES:
            raise TTDError(f"unknown candidate policy {policy!r}: use one of {', '.join(POLICIES)}")
        if policy == "nouns" and not tagger:
            raise TTDError("policy 'nouns' needs POS tags: run with the tagger, or use policy words or content")
        self.policy, self.tagger, self.batch_size = policy, tagger, batch_size
        self.noun_pairs = noun_pairs and tagger  # the compound rule: no list
        self.nlp = english_pipeline(tagger)
        from spacy.attrs import IDX, LEMMA, ORTH, POS, TAG

        self._attrs = [ORTH, IDX, POS, TAG, LEMMA] if tagger else [ORTH, IDX]
        self.matcher, self._canonical = (self._compound_matcher() if compounds else (None, {}))
        self._lex: dict[int, _Lex] = {}
        self._str: dict[int, str] = {}
        self._lemmas: dict[int, str] = {}
        self._cache: OrderedDict[str, Parsed] = OrderedDict()
        self.cache_size = cache_size
        self.parsed = 0  # captions that went through spaCy (cache hits do not count)

    def _compound_matcher(self):
        from spacy.matcher import PhraseMatcher

        matcher = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        canonical: dict[int, str] = {}
        by_singular: dict[str, list[str]] = {}
        for form, singular in compound_nouns():
            by_singular.setdefault(singular, []).append(form)
        for singular, forms in by_singular.items():
            matcher.add(singular, [self.nlp.make_doc(f) for f in forms])
            canonical[self.nlp.vocab.strings.add(singular)] = singular
        return matcher, canonical

    # ---- public

    def parse(self, texts: Sequence[str], dedupe: bool = True) -> list[Parsed | Exception]:
        """Candidates per text, in order. A text spaCy fails on gets its exception instead; the others are kept.
        With `dedupe`, each distinct text is parsed once (and recent ones are remembered across calls)."""
        if not dedupe:
            return self._parse_all(list(texts))
        results: dict[str, Parsed | Exception] = {}
        todo = []
        for t in dict.fromkeys(texts):
            hit = self._cache.get(t)
            if hit is None:
                todo.append(t)
            else:
                self._cache.move_to_end(t)
                results[t] = hit
        for t, r in zip(todo, self._parse_all(todo)):
            results[t] = r
            if self.cache_size and not isinstance(r, Exception):
                self._cache[t] = r
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [results[t] for t in texts]

    def parse_columns(self, texts: Sequence[str], dedupe: bool = True) -> TagColumns:
        """Candidates of `texts` as columns, rows labelled by input position. Without the tagger, captions are
        tokenised FAST_CHUNK at a time as one Doc and candidates built with array operations (about 4x the
        per-caption path); with it, per caption through `parse` (its cache included)."""
        texts = list(texts)
        if self.tagger:
            return TagColumns.from_parsed(self.parse(texts, dedupe=dedupe))
        parts = []
        for i in range(0, len(texts), FAST_CHUNK):
            chunk = texts[i:i + FAST_CHUNK]
            try:
                parts.append(self._chunk_columns(chunk, i))
            except Exception as exc:  # never lose a chunk: the per-caption path isolates the failing caption
                log.debug("batched tokenisation failed (%s); parsing %d captions one by one", exc, len(chunk))
                parts.append(TagColumns.from_parsed(self._parse_all(chunk), i))
                continue
            self.parsed += len(chunk)
        self._bound_memory()
        return TagColumns.concat(parts)

    def _chunk_columns(self, texts: list[str], offset: int) -> TagColumns:
        """The tokenizer splits text at spaces and treats each space-free chunk on its own, so the captions
        joined by single spaces give exactly the tokens of each caption alone (tested), at one Doc's cost."""
        from spacy.attrs import IDX, ORTH

        joined = " ".join(texts)
        lengths = np.fromiter(map(len, texts), np.int64, len(texts))
        starts = np.cumsum(lengths + 1) - lengths - 1
        doc = self.nlp.tokenizer(joined)
        arr = doc.to_array([ORTH, IDX])
        idx = arr[:, 1].astype(np.int64)
        cap = np.searchsorted(starts, idx, side="right") - 1
        uniq, inv = np.unique(arr[:, 0], return_inverse=True)
        lexemes = [self._lex.get(o) or self._lexeme(o) for o in uniq.tolist()]
        u_len = np.fromiter((len(x.text) for x in lexemes), np.int64, len(lexemes))
        u_stop = np.fromiter((x.is_stop for x in lexemes), bool, len(lexemes))
        u_alpha = np.fromiter((x.is_alpha for x in lexemes), bool, len(lexemes))
        u_word = np.fromiter((x.is_word for x in lexemes), bool, len(lexemes))
        tok_len, word = u_len[inv], u_word[inv]
        keep = word & ~u_stop[inv] if self.policy == "content" else word.copy()

        merges = self._chunk_hyphenated(joined, inv, lexemes, idx, cap, tok_len, word)
        found = self.matcher(doc) if self.matcher is not None else []
        if found:
            bounds = np.array([(s, e) for _, s, e in found], dtype=np.int64)
            inside = (cap[bounds[:, 0]] == cap[bounds[:, 1] - 1]).tolist()  # not across two captions
            merges += [_Merge(s, e, self._canonical.get(mid), True, 0)
                       for (mid, s, e), ok in zip(found, inside) if ok]
        merges.sort(key=lambda m: m.start)
        if any(a.end > b.start for a, b in zip(merges, merges[1:])):
            merges = sorted(_resolve_overlaps(merges), key=lambda m: m.start)
        ms = np.array([m.start for m in merges], dtype=np.int64)
        me = np.array([m.end for m in merges], dtype=np.int64)
        cover = np.zeros(len(idx) + 1, dtype=np.int64)
        np.add.at(cover, ms, 1)
        np.add.at(cover, me, -1)
        keep &= np.cumsum(cover[:-1]) == 0  # tokens inside a merged span are not candidates of their own
        tok_stop, tok_alpha = u_stop[inv], u_alpha[inv]
        nonstop = np.concatenate([[0], np.cumsum(word & ~tok_stop)])
        nonalpha = np.concatenate([[0], np.cumsum(word & ~tok_alpha)])
        m_stop = nonstop[me] == nonstop[ms]  # every word of the span is a stop word
        m_alpha = nonalpha[me] == nonalpha[ms]
        if self.policy == "content":
            ms, me, m_alpha = ms[~m_stop], me[~m_stop], m_alpha[~m_stop]
            merges = [m for m, stop in zip(merges, m_stop.tolist()) if not stop]
            m_stop = m_stop[~m_stop]
        begin = idx[ms]
        end = idx[me - 1] + tok_len[me - 1]
        m_text = [joined[b:e] for b, e in zip(begin.tolist(), end.tolist())]
        m_lower = [t.lower() for t in m_text]
        m_lemma = [m.lemma if m.lemma is not None else t for m, t in zip(merges, m_lower)]
        m_pos = ms
        m_start = begin - starts[cap[ms]]
        m_end = end - starts[cap[ms]]
        m_compound = np.array([m.compound for m in merges], dtype=bool)

        rows = np.flatnonzero(keep)
        n_u = len(lexemes)
        position = np.concatenate([rows, m_pos])
        order = np.argsort(position, kind="stable")
        token_cap = cap[position]
        index = pa.array(np.concatenate([inv[rows], n_u + np.arange(len(m_pos))])[order])
        u_text = [x.text for x in lexemes]
        u_lower = [x.lower for x in lexemes]
        text = pc.take(pa.array(u_text + m_text, pa.string()), index)
        lower = pc.take(pa.array(u_lower + m_lower, pa.string()), index)
        lemma = pc.take(pa.array(u_lower + m_lemma, pa.string()), index)
        char_start = np.concatenate([idx[rows] - starts[cap[rows]], m_start])[order]
        char_end = np.concatenate([idx[rows] - starts[cap[rows]] + tok_len[rows], m_end])[order]
        n = len(position)
        columns = {
            "text": text, "lower": lower, "lemma": lemma, "pos": pa.nulls(n, pa.string()),
            "char_start": char_start.astype(np.int32), "char_end": char_end.astype(np.int32),
            "is_stop": np.concatenate([tok_stop[rows], m_stop])[order],
            "is_alpha": np.concatenate([tok_alpha[rows], m_alpha])[order],
            "is_compound": np.concatenate([np.zeros(len(rows), bool), m_compound])[order],
        }
        return TagColumns(token_cap[order] + offset, columns, {})

    @staticmethod
    def _chunk_hyphenated(joined: str, inv: np.ndarray, lexemes: list[_Lex], idx: np.ndarray, cap: np.ndarray,
                          tok_len: np.ndarray, word: np.ndarray) -> list[_Merge]:
        """`_hyphenated` over a whole chunk: a '-' token glued to a word on each side, in one caption."""
        if "-" not in joined:
            return []
        hyphen = np.array([x.text == "-" for x in lexemes], dtype=bool)[inv]
        j = np.flatnonzero(hyphen[1:-1]) + 1
        j = j[word[j - 1] & word[j + 1] & (cap[j - 1] == cap[j + 1]) & (idx[j - 1] + tok_len[j - 1] == idx[j])
              & (idx[j] + 1 == idx[j + 1])]
        out: list[_Merge] = []
        for h in j.tolist():  # chains such as mother-in-law: hyphens two tokens apart extend the last span
            if out and out[-1].end - 1 == h - 1:
                out[-1] = _Merge(out[-1].start, h + 2, None, False, 1)
            else:
                out.append(_Merge(h - 1, h + 2, None, False, 1))
        return out

    # ---- spaCy

    def _docs(self, texts: list[str]) -> Iterable:
        if self.tagger:
            return self.nlp.pipe(texts, batch_size=self.batch_size)
        return self.nlp.tokenizer.pipe(texts, batch_size=self.batch_size)

    def _parse_all(self, texts: list[str]) -> list[Parsed | Exception]:
        out: list[Parsed | Exception] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            try:
                docs = list(self._docs(chunk))
            except Exception:  # one bad caption must not lose its batch: redo it one by one
                docs = [self._one(t) for t in chunk]
            for text, doc in zip(chunk, docs):
                if isinstance(doc, Exception):
                    out.append(doc)
                    continue
                try:
                    out.append(self._candidates(text, doc))
                except Exception as exc:
                    out.append(exc)
        self.parsed += len(texts)
        self._bound_memory()
        return out

    def _bound_memory(self) -> None:
        """spaCy keeps every string it has seen; on an open-ended stream of captions that grows without end.
        (`nlp.memory_zone` would free them, but inside a zone the tokenizer caches nothing: 3x slower.) So past
        MAX_STRINGS the model is reloaded, about a second per several million captions."""
        if len(self.nlp.vocab.strings) > MAX_STRINGS:
            log.debug("spaCy vocabulary holds %d strings: reloading the model", len(self.nlp.vocab.strings))
            english_pipeline.cache_clear()
            self.nlp = english_pipeline(self.tagger)
            self.matcher, self._canonical = (self._compound_matcher() if self.matcher is not None else (None, {}))
            self._lex.clear()
            self._str.clear()
            self._lemmas.clear()

    def _one(self, text: str):
        try:
            return next(iter(self._docs([text])))
        except Exception as exc:
            log.debug("spaCy failed on %r: %s", text[:80], exc)
            return exc

    def _string(self, h: int) -> str:
        s = self._str.get(h)
        if s is None:
            s = self._str[h] = self.nlp.vocab.strings[h]
        return s

    def _lemma(self, h: int) -> str:
        """Lower-cased, so 'Dog' opening a caption and 'dog' inside one count as one lemma."""
        s = self._lemmas.get(h)
        if s is None:
            s = self._lemmas[h] = self.nlp.vocab.strings[h].lower()
        return s

    def _lexeme(self, orth: int) -> _Lex:
        lex = self._lex.get(orth)
        if lex is None:
            x = self.nlp.vocab[orth]
            text = x.orth_
            lex = _Lex(text, x.lower_, bool(x.is_stop), bool(x.is_alpha),
                       not x.is_space and not x.is_punct and _is_word(text))
            self._lex[orth] = lex
        return lex

    # ---- candidates

    def _candidates(self, caption: str, doc) -> Parsed:
        """One caption's candidates. The hot loop of the stage: plain lists and cached per-lexeme facts only."""
        tagger = self.tagger
        rows = doc.to_array(self._attrs).tolist()
        if tagger:
            string, lemma = self._string, self._lemma
            pos = [string(r[2]) for r in rows]
            tags = [string(r[3]) for r in rows]
            lemmas = [lemma(r[4]) for r in rows]
        else:
            pos = tags = lemmas = None
        known, lexeme = self._lex.get, self._lexeme
        lex = [known(r[0]) or lexeme(r[0]) for r in rows]
        idx = [r[1] for r in rows]
        merges = self._merges(caption, doc, lex, idx, pos, tags)
        content, nouns = self.policy == "content", self.policy == "nouns"
        cands = []
        append = cands.append
        i, n = 0, len(rows)
        while i < n:
            if merges and i in merges:
                m = merges[i]
                cand = self._merged(caption, m, lex, idx, pos, lemmas)
                if cand is not None:
                    append(cand)
                i = m.end
                continue
            text, lower, is_stop, is_alpha, is_word = lex[i]
            if is_word and not (content and is_stop) and not (nouns and pos[i] not in NOUN_POS):
                start = idx[i]
                if tagger:
                    append((text, lower, lemmas[i], pos[i], start, start + len(text), is_stop, is_alpha, False))
                else:
                    append((text, lower, lower, None, start, start + len(text), is_stop, is_alpha, False))
            i += 1
        return Parsed(*zip(*cands)) if cands else _EMPTY

    def _merged(self, caption: str, m: _Merge, lex: list[_Lex], idx: list[int], pos: list[str] | None,
                lemmas: list[str] | None) -> tuple | None:
        last = m.end - 1
        start, end = idx[m.start], idx[last] + len(lex[last].text)
        text = caption[start:end]
        parts = [lex[j] for j in range(m.start, m.end) if lex[j].is_word]
        head_pos = pos[last] if pos else None
        if m.lemma is not None:
            lemma = m.lemma
        elif lemmas:
            lemma = caption[start:idx[last]].lower() + lemmas[last]
        else:
            lemma = text.lower()
        is_stop = all(p.is_stop for p in parts)
        if self.policy == "content" and is_stop:
            return None
        if self.policy == "nouns" and not (m.compound or head_pos in NOUN_POS):
            return None
        return (text, text.lower(), lemma, head_pos, start, end, is_stop, all(p.is_alpha for p in parts),
                m.compound)

    def _merges(self, caption: str, doc, lex: list[_Lex], idx: list[int], pos: list[str] | None,
                tags: list[str] | None) -> dict[int, _Merge]:
        """Token spans that become one candidate, by start token; overlaps go to the longest span."""
        spans = self._hyphenated(lex, idx) if "-" in caption else []
        if self.matcher is not None:
            spans += [_Merge(s, e, self._canonical.get(mid), True, 0) for mid, s, e in self.matcher(doc)]
        if self.noun_pairs:
            spans += self._pairs(lex, idx, pos, tags)
        return {m.start: m for m in _resolve_overlaps(spans)}

    @staticmethod
    def _hyphenated(lex: list[_Lex], idx: list[int]) -> list[_Merge]:
        """'t-shirt', 'x-ray', 'mother-in-law': spaCy splits at the hyphens; a tag is the whole word."""
        out = []
        i, n = 0, len(lex)
        while i + 2 < n:
            j = i
            while (j + 2 < n and lex[j].is_word and lex[j + 1].text == "-" and lex[j + 2].is_word
                   and idx[j] + len(lex[j].text) == idx[j + 1] and idx[j + 1] + 1 == idx[j + 2]):
                j += 2
            if j > i:
                out.append(_Merge(i, j + 1, None, False, 1))
                i = j + 1
            else:
                i += 1
        return out

    @staticmethod
    def _pairs(lex: list[_Lex], idx: list[int], pos: list[str], tags: list[str]) -> list[_Merge]:
        """Two adjacent nouns, a singular one first ('fire truck', 'traffic lights'), not inside a longer run of
        nouns (a run of three or more is more often a keyword list than one compound)."""
        out = []
        n = len(lex)
        for i in range(n - 1):
            a, b = lex[i], lex[i + 1]
            if not (tags[i] == "NN" and pos[i] == "NOUN" and tags[i + 1] in _PAIR_TAGS and pos[i + 1] == "NOUN"):
                continue
            if a.is_stop or b.is_stop or not (a.is_alpha and b.is_alpha):
                continue
            if idx[i] + len(a.text) + 1 != idx[i + 1]:
                continue
            if (i > 0 and pos[i - 1] in NOUN_POS) or (i + 2 < n and pos[i + 2] in NOUN_POS):
                continue
            out.append(_Merge(i, i + 2, None, True, 2))
        return out




def _resolve_overlaps(spans: list[_Merge]) -> list[_Merge]:
    """Overlapping spans go to the longest, then the better ranked, then the first."""
    taken: set[int] = set()
    out = []
    for m in sorted(spans, key=lambda m: (m.start - m.end, m.rank, m.start)):
        cover = range(m.start, m.end)
        if not taken.intersection(cover):
            taken.update(cover)
            out.append(m)
    return out
